//! An independent reader (pcap-parser) reads what our writer wrote, block for block, as our
//! own reader does: the same interfaces, timestamps, lengths and bytes.

use pcap_parser::{Block, PcapBlockOwned, PcapNGSlice};
use vsock_trace::pcapng::{Reader, Way, Writer};

#[test]
fn pcap_parser_agrees_with_our_reader() {
    let mut w = Writer::new(Vec::new(), "cross-check").unwrap();
    w.interface(271, "vsock", "packets", 1_700_000_000).unwrap();
    w.interface(147, "host", "events", 1_700_000_000).unwrap();
    let records: Vec<(u32, u64, Vec<u8>)> = (0..50u32)
        .map(|i| {
            let len = (i as usize * 37) % 301;
            let data = (0..len).map(|b| (b as u32 * 7 + i) as u8).collect();
            (i % 2, u64::from(i) * 1_000_003 + (1 << 33), data)
        })
        .collect();
    for (iface, ts, data) in &records {
        let way = if *iface == 0 {
            Way::Inbound
        } else {
            Way::Unknown
        };
        let queue = (*iface == 0).then_some(1);
        w.packet(*iface, *ts, &[data], data.len(), way, queue)
            .unwrap();
    }
    let bytes = w.into_inner();

    let mut theirs = Vec::new();
    let mut interfaces = Vec::new();
    for block in PcapNGSlice::from_slice(&bytes).expect("a pcapng file") {
        match block.expect("a valid block") {
            PcapBlockOwned::NG(Block::InterfaceDescription(idb)) => {
                interfaces.push((idb.linktype.0, idb.if_tsresol, idb.if_tsoffset));
            }
            PcapBlockOwned::NG(Block::EnhancedPacket(epb)) => {
                let ts = u64::from(epb.ts_high) << 32 | u64::from(epb.ts_low);
                theirs.push((
                    epb.if_id,
                    ts,
                    epb.data[..epb.caplen as usize].to_vec(),
                    epb.origlen,
                ));
            }
            _ => {}
        }
    }
    assert_eq!(
        interfaces,
        [(271, 9, 1_700_000_000), (147, 9, 1_700_000_000)]
    );
    assert_eq!(theirs.len(), records.len());

    let mut ours = Reader::new(&bytes).unwrap();
    for ((iface, ts, data), (their_iface, their_ts, their_data, origlen)) in
        records.iter().zip(&theirs)
    {
        let p = ours.next_packet().unwrap().unwrap();
        assert_eq!((p.interface, p.ts_nanos, p.data), (*iface, *ts, &data[..]));
        assert_eq!((their_iface, their_ts, their_data), (iface, ts, data));
        assert_eq!(*origlen as usize, data.len());
    }
    assert!(ours.next_packet().unwrap().is_none());
}
