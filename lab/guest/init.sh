#!/bin/sh
# /init of the ccidbridge test guest (busybox sh, PID 1).
#
# Kernel command-line words "name=value" that the kernel does not know arrive
# here as environment variables:
#   guest_timeout=S   power off after S seconds whatever happens (default 60)
#   usb_wait=S        how long to wait for the CCID reader on USB (default 10)
#   pcscd_log=0|1|2   0: keep pcscd's log in /tmp (its last 40 lines are printed
#                     if the client fails); 1: print it live (info level)
#                     prefixed "CCIDT pcscd "; 2: the same at debug level
#   steps=, apdus=, repeat=, mode=, monitor_ms=, reader=: for ccidt-client
# Every line meant for the host starts with "CCIDT ".
/bin/busybox mkdir -p /proc /sys /dev /run /tmp /usr/bin /usr/sbin /sbin
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t sysfs sysfs /sys
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp

# Values too long for the kernel command line come as files (boot.py's overlay).
for f in /ccidt/env/*; do
    [ -f "$f" ] && export "${f##*/}=$(cat "$f")"
done

up() { cut -d' ' -f1 /proc/uptime; }
say() { echo "CCIDT init $* t=$(up)"; }

# The guest-side watchdog: whatever hangs, the VM ends.
( sleep "${guest_timeout:-60}"; say timeout; poweroff -f ) &

say start kernel=$(uname -r)
for m in usb-common usbcore xhci-hcd xhci-pci; do
    insmod "/lib/modules/$m.ko" || say "insmod-failed $m"
done

# No udevd here: pcscd only sees readers that exist when it starts, so wait
# for QEMU's usb-ccid (08e6:4433) to be enumerated first.
found=
n=$(( ${usb_wait:-10} * 20 ))
while [ "$n" -gt 0 ]; do
    for d in /sys/bus/usb/devices/*; do
        if [ "$(cat "$d/idVendor" 2>/dev/null):$(cat "$d/idProduct" 2>/dev/null)" = "08e6:4433" ]; then
            found=$d
        fi
    done
    [ -n "$found" ] && break
    n=$((n - 1))
    sleep 0.05
done
if [ -n "$found" ]; then say usb-ready "${found##*/}"; else say usb-missing; fi

case "${pcscd_log:-0}" in
    1) /usr/sbin/pcscd -f -i 2>&1 | sed -e 's/^/CCIDT pcscd /' & ;;
    2) /usr/sbin/pcscd -f -d 2>&1 | sed -e 's/^/CCIDT pcscd /' & ;;
    *) /usr/sbin/pcscd -f -i > /tmp/pcscd.log 2>&1 & ;;
esac
say pcscd-started

# An image variant may bring its own program (lab/guest/middleware.py: the
# command runner); the minimal guest runs the PC/SC client.
if [ -x /ccidt/main ]; then /ccidt/main; else /usr/bin/ccidt-client; fi
rc=$?
say client-exit rc=$rc
# On failure show the end of pcscd's log even when it was not streamed.
if [ "$rc" != 0 ] && [ -f /tmp/pcscd.log ]; then
    tail -n 40 /tmp/pcscd.log | sed -e 's/^/CCIDT pcscd /'
fi
# Let pcscd's last log lines reach the console.
[ "${pcscd_log:-0}" != 0 ] && sleep 0.2
say poweroff
poweroff -f
