# The guest's half of the seqpacket checks (tests/tests/guest.rs, seqpacket_checks): each
# line vsock-seq-guest prints is compared with what the host side saw.
set -u
h=/guest/vsock-seq-guest
# The vsock device's feature bits, bit 0 first: bit 1 is VIRTIO_VSOCK_F_SEQPACKET.
for d in /sys/bus/virtio/devices/*; do
    if [ "$(cat "$d/device")" = "0x0013" ]; then
        echo "SEQ features bits=$(cut -c1-3 "$d/features")"
    fi
done
# The host client of <uds_path>_seqpacket connects to this one, retrying until it listens.
$h serve 6003 &
serve=$!
$h sizes 6001
$h echo 6002 10000
$h wrongtype 6004
$h bounds 6005
$h trunc 6006
$h timeout 6007
$h badbuf 6008
$h big 6010 20
wait $serve
echo SEQ-DONE
