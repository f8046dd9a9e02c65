#!/bin/sh
# /ccidt/main of the middleware guest (lab/guest/middleware.py): wait for the
# card, then run every /ccidt/cmd/NNN (a shell script) in name order and print
# its output and exit status on the console between clear markers:
#   CCIDT cmd n=NNN begin t=...
#   CCIDT out n=NNN |<one line of stdout+stderr, as printed>
#   CCIDT cmd n=NNN end rc=<exit status> t=...
#   CCIDT done rc=0 t=...
# cmd_timeout=S (kernel command line) bounds each command (default 60).
up() { cut -d' ' -f1 /proc/uptime; }
export HOME=/root GNUPGHOME=/root/.gnupg PATH=/usr/bin:/bin:/usr/sbin:/sbin
mkdir -p "$GNUPGHOME"
chmod 700 "$GNUPGHOME"
cp /ccidt/gnupg/* "$GNUPGHOME"/

# The card first: the client prints the reader and the ATR (CCIDT reader/atr).
steps=wait-card /usr/bin/ccidt-client

for f in /ccidt/cmd/*; do
    [ -f "$f" ] || continue
    n=${f##*/}
    echo "CCIDT cmd n=$n begin t=$(up)"
    timeout "${cmd_timeout:-60}" sh "$f" > /tmp/cmd.out 2>&1 < /dev/null
    rc=$?
    awk -v n="$n" '{ print "CCIDT out n=" n " |" $0 }' /tmp/cmd.out
    echo "CCIDT cmd n=$n end rc=$rc t=$(up)"
done
echo "CCIDT done rc=0 t=$(up)"
