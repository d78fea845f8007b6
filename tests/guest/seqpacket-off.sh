# With the daemon's --seqpacket off: the bit is not offered, and a seqpacket connect fails at
# once in the guest (tests/tests/guest.rs, seqpacket_off).
set -u
for d in /sys/bus/virtio/devices/*; do
    if [ "$(cat "$d/device")" = "0x0013" ]; then
        echo "SEQ features bits=$(cut -c1-3 "$d/features")"
    fi
done
/guest/vsock-seq-guest nosupport 6009
echo SEQ-DONE
