# The real-guest checks, run by the guest's /init. tests/tests/guest.rs plays the host side
# and reads the result lines this script prints on the serial console.
MIB=1048576

# 1. guest -> host, 64 MiB: the host hashes what arrives on <uds>_5001.
head -c $((64 * MIB)) /dev/urandom > /tmp/blob
echo "SHA g2h $(sha256sum /tmp/blob | cut -d' ' -f1)"
socat -u -b 65536 OPEN:/tmp/blob VSOCK-CONNECT:2:5001 || echo "FAIL g2h rc=$?"
rm -f /tmp/blob

# 2. host -> guest, 64 MiB: the host connects to 5002 once we listen.
echo "SHA h2g $(socat -u -b 65536 VSOCK-LISTEN:5002 STDOUT | sha256sum | cut -d' ' -f1)"

# 3. no host listener on 5999: the connect must fail with a reset, long before the
#    driver's own 2 s timeout.
t0=$(cut -d' ' -f1 /proc/uptime)
socat -u OPEN:/dev/null VSOCK-CONNECT:2:5999 2>/tmp/err
rc=$?
t1=$(cut -d' ' -f1 /proc/uptime)
echo "NOLISTEN rc=$rc t0=$t0 t1=$t1 err=$(tr '\n' ' ' < /tmp/err)"

# 4. half-close, guest first: send 1 MiB, shut down our writing, read the host's digest.
head -c $MIB /dev/urandom > /tmp/hc
want=$(sha256sum /tmp/hc | cut -d' ' -f1)
got=$(socat -t 30 -b 65536 - VSOCK-CONNECT:2:5003 < /tmp/hc)
echo "HALF g2h want=$want got=$got"

# 5. half-close, host first: the host sends to 5004, shuts down its writing, reads our digest.
socat -t 30 -b 65536 VSOCK-LISTEN:5004 EXEC:sha256sum
echo "HALF h2g rc=$?"

# 6. eight streams at once each way.
for i in 1 2 3 4 5 6 7 8; do
    head -c $((4 * MIB)) /dev/urandom > /tmp/p$i
    echo "SHA par $(sha256sum /tmp/p$i | cut -d' ' -f1)"
done
for i in 1 2 3 4 5 6 7 8; do
    socat -u -b 65536 OPEN:/tmp/p$i VSOCK-CONNECT:2:5005 &
done
wait
rm -f /tmp/p*
socat -t 30 -b 65536 VSOCK-LISTEN:5006,fork,backlog=16 EXEC:sha256sum &
listener=$!
# The host says on 5007 when it has checked all eight.
echo "PAR h2g $(socat -u VSOCK-LISTEN:5007 STDOUT)"
kill $listener

# 7. 200 short connections in a row, each echoed by the host.
ok=0
i=0
while [ $i -lt 200 ]; do
    [ "$(echo "m$i" | socat -t 10 - VSOCK-CONNECT:2:5008 2>/dev/null)" = "m$i" ] && ok=$((ok + 1))
    i=$((i + 1))
done
echo "SHORT ok=$ok"
echo "CHECKS-DONE"
