#!/bin/bash
# Runs inside the guest (chrooted into the host's root, read-only; /run is a tmpfs).
# Each test prints "QSD-VM-RESULT ok|fail NAME".
top=$1
work=/run/qsd-vm
mkdir -p "$work"
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

# Starts `qsd-csi standalone --device $2` (default nbd) with its state under $1 and waits for its
# socket. Sets $driver (its pid) and $ep (its endpoint). The log is appended to, across restarts.
start_driver() {
  local dir=$1 device=${2:-nbd}
  mkdir -p "$dir"
  rm -f "$dir/csi.sock"
  ep=unix://$dir/csi.sock
  "${driver_bin:-$top/target/debug/qsd-csi}" standalone --endpoint "$ep" --state-dir "$dir/state" --node vm \
    --device "$device" >>"$dir/driver.log" 2>&1 &
  driver=$!
  echo "$dir $device" >>"$work/.drivers"
  for _ in $(seq 600); do [[ -S $dir/csi.sock ]] && return 0; sleep 0.1; done
  return 1
}

result() { if [[ $2 -eq 0 ]]; then echo "QSD-VM-RESULT ok $1"; else echo "QSD-VM-RESULT fail $1"; fi; }

# --- Teardown: what a test made goes once it ends, pass or fail ---------------------------------
# start_driver lists each driver's directory and device kind in $work/.drivers. After every test,
# `teardown` has each listed driver (started again if the test killed it or it hangs) unstage
# what its staging journal holds — the driver's own way to take a device down, ublk's included —
# then stops the drivers and daemons, and sweeps at the kernel's level whatever is left (mounts
# under $work, connected nbd devices, loop devices). `leftovers` names what survives that.

# Prints "VOLUME STAGING_DIR TARGET" per publish in the staging journal under $1 ("-": none).
staged_volumes() {
  python3 - "$1" <<'PY'
import json, os, sys
d = sys.argv[1]
for f in sorted(os.listdir(d)) if os.path.isdir(d) else []:
    if f.endswith(".json"):
        r = json.load(open(os.path.join(d, f)))
        for t in r.get("targets") or ["-"]:
            print(r["volume_id"], os.path.dirname(r["staging_path"]), t)
PY
}

# Unstages every volume driver directory $1 (device kind $2) staged, then stops its driver and
# daemon.
tear_driver() {
  local dir=$1 device=$2 bin=$top/target/debug/qsd-csi ep=unix://$1/csi.sock
  staged_volumes "$dir/state/staging" >"$work/.staged"
  # Only a driver with something staged is needed (and started again if the test killed it).
  if [[ -s $work/.staged ]] && ! timeout 10 "$bin" --endpoint "$ep" volume list >/dev/null 2>&1; then
    pkill -KILL -f -- "--state-dir $dir/state"
    start_driver "$dir" "$device" || echo "teardown: the driver in $dir did not start again"
  fi
  local id staging target
  while read -r id staging target; do
    [[ $target == - ]] && target=$staging/.none
    timeout 60 "$bin" --endpoint "$ep" unpublish "$id" "$target" --staging-dir "$staging" ||
      echo "teardown: unpublishing $id from $target failed"
  done <"$work/.staged" # (no process substitution: the guest's /dev lacks /dev/fd)
  pkill -TERM -f -- "--state-dir $dir/state"
  local qsd; qsd=$(cat "$dir/state/run/qsd.pid" 2>/dev/null) && kill "$qsd" 2>/dev/null
}

teardown() {
  # Nothing stays stopped: a SIGSTOPped daemon or plugin would hang every step below.
  pkill -CONT -f qemu-storage-daemon; pkill -CONT -f "qsd-csi standalone"
  pkill -KILL -x fio
  for _ in $(seq 100); do pgrep -x fio >/dev/null || break; sleep 0.1; done
  local dir device
  if [[ -e $work/.drivers ]]; then
    sort -u "$work/.drivers" >"$work/.drivers.torn"
    while read -r dir device; do tear_driver "$dir" "$device"; done <"$work/.drivers.torn"
    rm -f "$work/.drivers" "$work/.drivers.torn"
  fi
  for _ in $(seq 100); do pgrep -f "qsd-csi standalone|qemu-storage-daemon" >/dev/null || break; sleep 0.1; done
  pkill -KILL -f "qsd-csi standalone|qemu-storage-daemon"
  wait 2>/dev/null # the drivers this shell started again, reaped
  local m
  findmnt -rn -o TARGET | grep "^$work/" | sort -r >"$work/.mounts"
  while read -r m; do umount -l "$m"; done <"$work/.mounts"
  local pid
  for pid in /sys/block/nbd*/pid; do
    [[ -e $pid ]] && nbd-client -d "/dev/$(basename "$(dirname "$pid")")" >/dev/null
  done
  losetup -D
  pkill -KILL -x nbd-client
  for _ in $(seq 100); do [[ -z $(leftovers) ]] && break; sleep 0.1; done
}

# Prints each line of $2 with $1 in front.
lines() { echo "$1${2//$'\n'/$'\n'$1}"; }

# What is left on the guest that a test made: processes, mounts under $work, nbd and ublk
# devices, loop devices. Prints one line per kind; nothing when clean.
leftovers() {
  local p; p=$(pgrep -f "qsd-csi standalone|qemu-storage-daemon|nbd-client" | paste -sd' ')
  [[ -z $p ]] || echo "processes: $p"
  pgrep -x fio >/dev/null && echo "fio: $(pgrep -x fio | paste -sd' ')"
  local m; m=$(findmnt -rn -o TARGET | grep "^$work/" | paste -sd' ')
  [[ -z $m ]] || echo "mounts: $m"
  local nbd=() f
  for f in /sys/block/nbd*/pid; do [[ -e $f ]] && nbd+=("$(basename "$(dirname "$f")")"); done
  ((${#nbd[@]} == 0)) || echo "nbd devices connected: ${nbd[*]}"
  compgen -G '/dev/ublkc*' >/dev/null && echo "ublk devices: $(cd /dev && echo ublkc*)"
  local loops; loops=$(losetup -n -O NAME | paste -sd' ')
  [[ -z $loops ]] || echo "loop devices: $loops"
}

# The kernel offers the devices the project targets.
test_kernel_devices() {
  [[ -b /dev/nbd0 ]] && grep -qw nbd /proc/modules && [[ -c /dev/ublk-control ]]
}

# qemu-storage-daemon's NBD export on a unix socket, the kernel NBD client, ext4, data back.
test_daemon_nbd_export_through_the_kernel() {
  local img=$work/a.qcow2 sock=$work/nbd.sock qmp=$work/qmp.sock
  qemu-img create -q -f qcow2 "$img" 256M || return 1
  qemu-storage-daemon --blockdev "driver=file,filename=$img,node-name=f" \
    --blockdev driver=qcow2,file=f,node-name=q \
    --nbd-server "addr.type=unix,addr.path=$sock" \
    --export type=nbd,id=x,node-name=q,name=vol,writable=on \
    --chardev "socket,id=c,path=$qmp,server=on,wait=off" --monitor chardev=c \
    --pidfile "$work/qsd.pid" --daemonize || return 1
  # Its own device, the last: when nbd-client's ioctl loop ends after -d it clears the
  # device's sockets (NBD_CLEAR_SOCK), which on nbd0 could land on the connection the next
  # test's driver has just made there over netlink.
  local dev=/dev/nbd15
  nbd-client -unix "$sock" $dev -N vol -b 4096 >/dev/null || return 1
  mkfs.ext4 -q $dev || return 1
  mkdir -p "$work/mnt" && mount $dev "$work/mnt" || return 1
  head -c 16M /dev/urandom >"$work/data"
  cp "$work/data" "$work/mnt/data" && sync
  umount "$work/mnt" && mount $dev "$work/mnt" || return 1
  cmp -s "$work/data" "$work/mnt/data"
  local ok=$?
  umount "$work/mnt"; nbd-client -d $dev >/dev/null
  # The client has let go of the device once the kernel lists no pid for it.
  for _ in $(seq 100); do [[ -e /sys/block/nbd15/pid ]] || break; sleep 0.1; done
  kill "$(cat "$work/qsd.pid")"
  return $ok
}

# qsd-csi's own nbd backend, end to end through the CLI: NodeStage negotiates with the daemon's
# NBD export and hands the socket to the kernel over netlink; expand re-creates the export and
# NodeExpandVolume reconnects the device with RECONFIGURE before growing ext4.
test_qsd_csi_nbd_backend() {
  local bin=$top/target/debug/qsd-csi dir=$work/csi st=$work/csi/staging m=$work/csi/vol
  start_driver "$dir" || return 1
  # Root here holds CAP_SYS_RESOURCE: the daemon must run as an I/O flusher the OOM killer spares
  # (task flag PF_MEMALLOC_NOIO 0x80000 is field 9 of /proc/<pid>/stat).
  local qsd; qsd=$(cat "$dir/state/run/qsd.pid")
  [[ $(cat "/proc/$qsd/oom_score_adj") == -1000 ]] || { echo "oom_score_adj not -1000"; return 1; }
  local flags; flags=$(sed 's/.*) //' "/proc/$qsd/stat" | awk '{print $7}')
  (( flags & 0x80000 )) || { echo "PR_SET_IO_FLUSHER not set (flags $flags)"; return 1; }
  local id
  id=$("$bin" --endpoint "$ep" volume create data --size 256M) || return 1
  "$bin" --endpoint "$ep" publish "$id" "$m" --staging-dir "$st" || return 1
  findmnt -rn -o SOURCE --target "$m" | grep -q '^/dev/nbd' || { echo "not on an nbd device"; return 1; }
  head -c 16M /dev/urandom >"$work/data2" && cp "$work/data2" "$m/data2" && sync || return 1
  fio --name=verify --filename="$m/fio" --size=8M --verify_state_save=0 --rw=randwrite --bs=4k --iodepth=8 \
    --ioengine=libaio --direct=1 --verify=crc32c --do_verify=1 --verify_fatal=1 >"$dir/fio.log" || return 1
  "$bin" --endpoint "$ep" expand "$id" 512M --staging-dir "$st" || return 1
  local size; size=$(df -B1 --output=size "$m" | tail -1)
  [[ $size -gt 400000000 ]] || { echo "df still shows $size bytes"; return 1; }
  cmp "$work/data2" "$m/data2" || return 1
  "$bin" --endpoint "$ep" unpublish "$id" "$m" --staging-dir "$st" || return 1
  for p in /sys/block/nbd*/pid; do [[ -e $p ]] && { echo "$p still connected"; return 1; }; done
  "$bin" --endpoint "$ep" volume delete "$id" || return 1
  kill "$driver"; wait "$driver" 2>/dev/null
  kill "$(cat "$dir/state/run/qsd.pid")"
  tail -5 "$dir/driver.log"
  return 0
}

# A verifying writer on a staged volume: 12 MiB at 1 MiB/s, O_DIRECT|O_SYNC like a database (each
# write durable before it completes: unflushed writes may be lost when a storage daemon dies, as
# with a disk cache on power loss), then a full verification pass. Sets $writer (fio's pid) and
# returns once it is well under way.
start_writer() {
  local file=$1 log=$2
  fio --name=survive --filename="$file" --size=12M --rw=write --bs=64k --rate=1m --direct=1 --sync=1 \
    --ioengine=psync --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_state_save=0 \
    >"$log" 2>&1 &
  writer=$!
  for _ in $(seq 600); do [[ $(stat -c %s "$file" 2>/dev/null || echo 0) -gt 3000000 ]] && return 0; sleep 0.1; done
  return 1
}

# Whether a fio process sleeps uninterruptibly (state D): waiting on the device. A flush is not
# counted in /sys/block/*/inflight (only reads and writes are), so a writer stuck in O_SYNC's
# flush on the stopped daemon shows there as nothing in flight.
writer_blocked() {
  local stat comm state
  for stat in /proc/[0-9]*/stat; do
    read -r _ comm state _ 2>/dev/null <"$stat" || continue
    [[ $comm == "(fio)" && $state == D ]] && return 0
  done
  return 1
}

# Stops process $1 (SIGSTOP) once the writer's requests pile up on the device under mount $2:
# afterwards a request is certainly in flight, held by the stopped process or waiting on it —
# a read or write the device counts, or a flush the writer has been blocked on for 0.5 s.
stop_with_io_in_flight() {
  local pid=$1 dev blocked=0; dev=$(basename "$(findmnt -rn -o SOURCE --target "$2")")
  kill -STOP "$pid" || return 1
  for _ in $(seq 600); do
    read -r r w <"/sys/block/$dev/inflight"
    (( r + w > 0 )) && return 0
    if writer_blocked; then blocked=$((blocked + 1)); else blocked=0; fi
    ((blocked >= 10)) && return 0
    sleep 0.05
  done
  # Never leave the process stopped: the device's I/O would hang on it until the guest times out.
  kill -CONT "$pid"
  local state=ended; kill -0 "$writer" 2>/dev/null && state=running
  echo "no request in flight on $dev in 30 s (the writer: $state; inflight: $r $w)"; return 1
}

# Waits for the writer; fails unless it verified every block without an I/O error.
writer_verified() {
  local log=$1 rc
  wait "$writer"; rc=$?
  grep -E "err=|verify" "$log" | head -5
  if ! { [[ $rc -eq 0 ]] && grep -q "err= 0" "$log"; }; then echo "fio failed ($rc)"; return 1; fi
}

# qemu-storage-daemon SIGKILLed under a verifying writer: the engine restarts it and rebuilds the
# export; the device gets back to it (nbd: RECONFIGURE onto a new socket; ublk: the server
# reconnects) and the writer sees no error.
daemon_killed_under_a_verifying_writer() {
  local backend=$1 bin=$top/target/debug/qsd-csi dir; dir=$(mktemp -d "$work/restart-$1.XXXX")
  local st=$dir/staging m=$dir/vol
  start_driver "$dir" "$backend" || return 1
  local id
  id=$("$bin" --endpoint "$ep" volume create survive --size 128M) || return 1
  "$bin" --endpoint "$ep" publish "$id" "$m" --staging-dir "$st" || return 1
  local old; old=$(cat "$dir/state/run/qsd.pid")
  start_writer "$m/data" "$dir/fio.log" || return 1
  stop_with_io_in_flight "$old" "$m" || return 1
  kill -9 "$old" || return 1
  writer_verified "$dir/fio.log" || { tail -20 "$dir/driver.log"; return 1; }
  local new; new=$(cat "$dir/state/run/qsd.pid")
  [[ $new != "$old" ]] || { echo "the daemon was not restarted"; return 1; }
  case $backend in
    nbd) grep -q "re-attached the NBD device" "$dir/driver.log" || { echo "no re-attach logged"; return 1; } ;;
    ublk) grep -q "ublk server reconnected" "$dir/driver.log" || { echo "no reconnect logged"; return 1; } ;;
  esac
  "$bin" --endpoint "$ep" unpublish "$id" "$m" --staging-dir "$st" || return 1
  "$bin" --endpoint "$ep" volume delete "$id" || return 1
  kill "$driver"; wait "$driver" 2>/dev/null
  kill "$new"
  return 0
}
test_daemon_killed_under_a_verifying_writer() { daemon_killed_under_a_verifying_writer nbd; }
test_daemon_killed_under_a_verifying_writer_ublk() { daemon_killed_under_a_verifying_writer ublk; }

# qsd-csi's ublk backend end to end: the plugin serves /dev/ublkbN and forwards to the daemon's
# NBD export; mkfs, fio verify, data back after a re-stage; expansion; detach leaves no device.
test_qsd_csi_ublk_backend() {
  local bin=$top/target/debug/qsd-csi dir=$work/ublk st=$work/ublk/staging m=$work/ublk/vol
  start_driver "$dir" ublk || return 1
  local id
  id=$("$bin" --endpoint "$ep" volume create data --size 256M) || return 1
  "$bin" --endpoint "$ep" publish "$id" "$m" --staging-dir "$st" || return 1
  findmnt -rn -o SOURCE --target "$m" | grep -q '^/dev/ublkb' || { echo "not on a ublk device"; return 1; }
  head -c 16M /dev/urandom >"$work/data3" && cp "$work/data3" "$m/data3" && sync || return 1
  fio --name=verify --filename="$m/fio" --size=8M --verify_state_save=0 --rw=randwrite --bs=4k --iodepth=16 \
    --ioengine=libaio --direct=1 --verify=crc32c --do_verify=1 --verify_fatal=1 >"$dir/fio.log" || return 1
  # Online growth needs UBLK_F_UPDATE_SIZE (Linux 6.16); on older drivers NodeExpandVolume says so
  # and the device shows the new size after a re-stage.
  local out online=1
  out=$("$bin" --endpoint "$ep" expand "$id" 512M --staging-dir "$st" 2>&1) || online=0
  if [[ $online -eq 0 ]]; then
    echo "$out" | grep -q "UBLK_F_UPDATE_SIZE" || { echo "unexpected expand failure: $out"; return 1; }
    "$bin" --endpoint "$ep" unpublish "$id" "$m" --staging-dir "$st" || return 1
    "$bin" --endpoint "$ep" publish "$id" "$m" --staging-dir "$st" || return 1
    "$bin" --endpoint "$ep" expand "$id" 512M --staging-dir "$st" || return 1
  fi
  local size; size=$(df -B1 --output=size "$m" | tail -1)
  [[ $size -gt 400000000 ]] || { echo "df shows $size bytes"; return 1; }
  cmp "$work/data3" "$m/data3" || return 1
  "$bin" --endpoint "$ep" unpublish "$id" "$m" --staging-dir "$st" || return 1
  if compgen -G '/sys/block/ublkb*' >/dev/null; then
    echo "a ublk device is left: $(cd /sys/block && echo ublkb*)"; return 1
  fi
  if compgen -G '/dev/ublkc*' >/dev/null; then echo "a ublk char device is left"; return 1; fi
  "$bin" --endpoint "$ep" volume delete "$id" || return 1
  kill "$driver"; wait "$driver" 2>/dev/null
  kill "$(cat "$dir/state/run/qsd.pid")"
  return 0
}

# Whether this kernel's ublk driver resizes a started device (UBLK_F_UPDATE_SIZE, Linux 6.16).
ublk_resizes() {
  local v; v=$(uname -r); v=${v%%[-+]*}
  [[ $(printf '%s\n' 6.16 "$v" | sort -V | head -1) == 6.16 ]]
}

# A test that cannot run on this kernel says why on its last line and returns this.
SKIP=77

# `--device auto` picks ublk where the driver can grow a started device, nbd otherwise.
test_auto_picks_the_backend_the_kernel_serves_best() {
  local bin=$top/target/debug/qsd-csi dir=$work/auto st=$work/auto/staging m=$work/auto/vol
  start_driver "$dir" auto || return 1
  local id want=nbd
  ublk_resizes && want=ublkb
  id=$("$bin" --endpoint "$ep" volume create auto --size 64M) || return 1
  "$bin" --endpoint "$ep" publish "$id" "$m" --staging-dir "$st" || return 1
  local source; source=$(findmnt -rn -o SOURCE --target "$m")
  [[ $source == /dev/$want* ]] || { echo "auto staged on $source on $(uname -r), not $want"; return 1; }
  "$bin" --endpoint "$ep" unpublish "$id" "$m" --staging-dir "$st" || return 1
  "$bin" --endpoint "$ep" volume delete "$id" || return 1
  kill "$driver"; wait "$driver" 2>/dev/null
  kill "$(cat "$dir/state/run/qsd.pid")"
  return 0
}

# NodeExpandVolume grows a mounted filesystem ($1) on a ublk device under a verifying writer,
# with no re-stage: the same device, the new size, the writer sees no error and verifies.
ublk_grows_online_under_a_writer() {
  local fs=$1 bin=$top/target/debug/qsd-csi dir=$work/grow-$1 st=$work/grow-$1/staging m=$work/grow-$1/vol
  ublk_resizes || { echo "needs UBLK_F_UPDATE_SIZE (Linux 6.16; this is $(uname -r))"; return $SKIP; }
  start_driver "$dir" ublk || return 1
  local id
  id=$("$bin" --endpoint "$ep" volume create "grow-$fs" --size 512M) || return 1
  "$bin" --endpoint "$ep" publish "$id" "$m" --fs-type "$fs" --staging-dir "$st" || return 1
  local before; before=$(findmnt -rn -o SOURCE --target "$m")
  [[ $before == /dev/ublkb* ]] || { echo "not on a ublk device: $before"; return 1; }
  start_writer "$m/data" "$dir/fio.log" || return 1
  "$bin" --endpoint "$ep" expand "$id" 1G --staging-dir "$st" || return 1
  kill -0 "$writer" 2>/dev/null || { echo "the writer ended before the expansion did"; return 1; }
  local after; after=$(findmnt -rn -o SOURCE --target "$m")
  [[ $after == "$before" ]] || { echo "re-staged: $before became $after"; return 1; }
  local bytes; bytes=$(blockdev --getsize64 "$after")
  [[ $bytes -eq 1073741824 ]] || { echo "$after has $bytes bytes"; return 1; }
  local size; size=$(df -B1 --output=size "$m" | tail -1)
  [[ $size -gt 900000000 ]] || { echo "$fs shows $size bytes"; return 1; }
  writer_verified "$dir/fio.log" || return 1
  "$bin" --endpoint "$ep" unpublish "$id" "$m" --staging-dir "$st" || return 1
  "$bin" --endpoint "$ep" volume delete "$id" || return 1
  kill "$driver"; wait "$driver" 2>/dev/null
  kill "$(cat "$dir/state/run/qsd.pid")"
  return 0
}
test_ublk_grows_a_mounted_ext4_under_a_writer() { ublk_grows_online_under_a_writer ext4; }
test_ublk_grows_a_mounted_xfs_under_a_writer() { ublk_grows_online_under_a_writer xfs; }

# The ublk server (the node plugin) SIGKILLed under a verifying writer and started again: the
# kernel quiesced the device and kept its I/O; the new plugin recovers it (START/END_USER_RECOVERY)
# and the kernel re-issues the requests. The daemon, running on its own, is untouched.
test_ublk_server_killed_under_a_verifying_writer() {
  local bin=$top/target/debug/qsd-csi dir=$work/recover st=$work/recover/staging m=$work/recover/vol
  start_driver "$dir" ublk || return 1
  local id
  id=$("$bin" --endpoint "$ep" volume create recover --size 128M) || return 1
  "$bin" --endpoint "$ep" publish "$id" "$m" --staging-dir "$st" || return 1
  local qsd; qsd=$(cat "$dir/state/run/qsd.pid")
  start_writer "$m/data" "$dir/fio.log" || return 1
  # The daemon held still, so the plugin dies with the writer's request in its hands.
  stop_with_io_in_flight "$qsd" "$m" || return 1
  kill -9 "$driver" || return 1
  wait "$driver" 2>/dev/null
  kill -CONT "$qsd"
  start_driver "$dir" ublk || return 1
  writer_verified "$dir/fio.log" || { tail -20 "$dir/driver.log"; return 1; }
  grep -q "recovered the ublk device" "$dir/driver.log" || { echo "no recovery logged"; tail "$dir/driver.log"; return 1; }
  [[ $(cat "$dir/state/run/qsd.pid") == "$qsd" ]] || { echo "the daemon was restarted"; return 1; }
  "$bin" --endpoint "$ep" unpublish "$id" "$m" --staging-dir "$st" || return 1
  if compgen -G '/sys/block/ublkb*' >/dev/null; then echo "a ublk device is left"; return 1; fi
  "$bin" --endpoint "$ep" volume delete "$id" || return 1
  kill "$driver"; wait "$driver" 2>/dev/null
  kill "$qsd"
  return 0
}

# The harness itself: a test made to fail half-way leaves nothing behind once torn down. It
# leaves a driver on each backend with a volume staged, a writer on one with that daemon
# SIGSTOPped under it, the other's ublk server SIGKILLed with its device waiting for it, and an
# ext4 on a loop device mounted besides.
fails_half_way() {
  local bin=$top/target/debug/qsd-csi dir=$work/half id
  start_driver "$dir/nbd" nbd || return 1
  id=$("$bin" --endpoint "$ep" volume create half-nbd --size 64M) || return 1
  "$bin" --endpoint "$ep" publish "$id" "$dir/nbd/vol" --staging-dir "$dir/nbd/staging" || return 1
  start_writer "$dir/nbd/vol/data" "$dir/fio.log" || return 1
  kill -STOP "$(cat "$dir/nbd/state/run/qsd.pid")" || return 1
  start_driver "$dir/ublk" ublk || return 1
  id=$("$bin" --endpoint "$ep" volume create half-ublk --size 64M) || return 1
  "$bin" --endpoint "$ep" publish "$id" "$dir/ublk/dev" --block --staging-dir "$dir/ublk/staging" || return 1
  kill -9 "$driver" || return 1
  truncate -s 64M "$dir/loop.img" && mkfs.ext4 -q "$dir/loop.img" && mkdir -p "$dir/mnt" || return 1
  mount -o loop "$dir/loop.img" "$dir/mnt" || return 1
  echo "failing half-way, as a broken test would"
  return 1
}
test_a_failed_test_leaves_nothing_behind() {
  ( fails_half_way ) >"$work/half-way.log" 2>&1 && { echo "the failing test passed"; return 1; }
  tail -3 "$work/half-way.log"
  local made; made=$(leftovers)
  lines "made: " "$made"
  for kind in processes fio mounts "nbd devices" "ublk devices" "loop devices"; do
    grep -q "^$kind" <<<"$made" || { echo "the failing test made no $kind"; return 1; }
  done
  teardown
  local left; left=$(leftovers)
  [[ -z $left ]] || { lines "left behind: " "$left"; return 1; }
}

# One fio job on $1 for $3 seconds: prints IOPS (4 KiB jobs) or MiB/s (seqwrite-1m), then the
# number of I/Os done. $2 is the job's name as the benchmark lines spell it.
fio_figure() {
  local target=$1 job=$2 seconds=$3 rw bs depth
  case $job in
    randread-4k-qd1) rw=randread bs=4k depth=1 ;;
    randread-4k-qd32) rw=randread bs=4k depth=32 ;;
    randwrite-4k-qd1) rw=randwrite bs=4k depth=1 ;;
    randwrite-4k-qd32) rw=randwrite bs=4k depth=32 ;;
    seqwrite-1m) rw=write bs=1M depth=4 ;;
  esac
  fio --name=bench --filename="$target" --size=192M --rw=$rw --bs=$bs --iodepth=$depth \
    --ioengine=libaio --direct=1 --time_based --runtime="$seconds" --output-format=json |
    python3 -c 'import json, sys
job = json.load(sys.stdin)["jobs"][0]
side = job["read"] if sys.argv[1].startswith("randread") else job["write"]
print(side["bw"] / 1024 if sys.argv[1] == "seqwrite-1m" else side["iops"], side["total_ios"])' "$job"
}

# CPU time (clock ticks: user + system) a process has used so far.
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }

# The data-path benchmark, not a test (QSD_CSI_VM_TESTS=bench_datapath e2e/vm/run.sh): each
# kernel device backend (ublk, nbd, fuse + loop) staged as a raw block volume by the optimised
# driver, fio on it, each figure over the same job on a loop device over a raw file in the same
# tmpfs, measured first (the same baseline on every kernel: tmpfs takes O_DIRECT from 6.6 only).
# Prints "QSD-VM-BENCH datapath BACKEND QEMU KERNEL JOB ratio=R".
bench_datapath() {
  local seconds=${QSD_VM_BENCH_SECONDS:-5} dir=$work/bench
  driver_bin=$top/target/release/qsd-csi
  [[ -x $driver_bin ]] || { echo "no release build of qsd-csi"; return 1; }
  local kernel qemu jobs=(randread-4k-qd1 randread-4k-qd32 randwrite-4k-qd1 randwrite-4k-qd32 seqwrite-1m)
  kernel=$(uname -r | grep -oE '^[0-9]+\.[0-9]+')
  qemu=$(qemu-storage-daemon --version | grep -oE '[0-9]+\.[0-9]+' | head -1)
  mkdir -p "$dir"
  # The baseline: a loop device over a raw file in the same tmpfs, on both kernels (tmpfs takes
  # O_DIRECT only from Linux 6.6; where it does, fio straight on the file is shown on # lines).
  local raw=$dir/baseline.raw loop
  fio --name=fill --filename="$raw" --size=192M --rw=write --bs=1M --ioengine=psync >/dev/null || return 1
  loop=$(losetup -f --show "$raw") || return 1
  declare -A base
  local job value
  for job in "${jobs[@]}"; do
    value=$(fio_figure "$loop" "$job" "$seconds") || return 1
    value=${value% *}
    base[$job]=$value
    echo "QSD-VM-BENCH # baseline (loop over a raw file on tmpfs) $kernel $job $value"
  done
  losetup -d "$loop"
  if fio --name=probe --filename="$raw" --size=4k --rw=read --bs=4k --direct=1 --ioengine=psync >/dev/null 2>&1; then
    for job in "${jobs[@]}"; do
      echo "QSD-VM-BENCH # O_DIRECT on the raw file itself $kernel $job $(fio_figure "$raw" "$job" "$seconds" | cut -d' ' -f1)"
    done
  fi
  rm -f "$raw"
  local backend id dev
  for backend in ublk nbd fuse; do
    start_driver "$dir/$backend" "$backend" || return 1
    id=$("$driver_bin" --endpoint "$ep" volume create "b-$backend" --size 192M) || return 1
    dev=$dir/$backend/device
    "$driver_bin" --endpoint "$ep" publish "$id" "$dev" --block --staging-dir "$dir/$backend/st" || return 1
    # Every cluster allocated, as on the raw file.
    fio --name=fill --filename="$dev" --size=192M --rw=write --bs=1M --iodepth=4 --ioengine=libaio \
      --direct=1 >/dev/null || return 1
    # Where the time goes: CPU per I/O of the daemon and of the plugin (the ublk server).
    local daemon plugin d0 p0 out ios
    daemon=$(cat "$dir/$backend/state/run/qsd.pid") plugin=$driver
    for job in "${jobs[@]}"; do
      d0=$(cpu_ticks "$daemon") p0=$(cpu_ticks "$plugin")
      out=$(fio_figure "$dev" "$job" "$seconds") || return 1
      value=${out% *} ios=${out#* }
      ((ios > 0)) || ios=1
      # A tick is 10 ms: 10,000 µs.
      echo "QSD-VM-BENCH # $backend $kernel $job $value ($(readlink -f "$dev")): CPU per I/O:" \
        "daemon $((($(cpu_ticks "$daemon") - d0) * 10000 / ios)) µs," \
        "plugin $((($(cpu_ticks "$plugin") - p0) * 10000 / ios)) µs"
      echo "QSD-VM-BENCH datapath $backend $qemu $kernel $job ratio=$(python3 -c \
        'import sys; print(f"{float(sys.argv[1]) / float(sys.argv[2]):.2f}")' "$value" "${base[$job]}")"
    done
    "$driver_bin" --endpoint "$ep" unpublish "$id" "$dev" --staging-dir "$dir/$backend/st" || return 1
    "$driver_bin" --endpoint "$ep" volume delete "$id" || return 1
    kill "$driver"; wait "$driver" 2>/dev/null
    kill "$(cat "$dir/$backend/state/run/qsd.pid")"
  done
  driver_bin=
  return 0
}

# The Rust device tests (node-plugin/tests/kernel_devices.rs), one result each.
run_rust_tests() {
  local log=$work/rust-tests.log
  QSD_TEST_TMPDIR=$work RUST_BACKTRACE=0 "$QSD_VM_RUST_TESTS" --ignored --test-threads=1 \
    "${QSD_VM_RUST_FILTER:-}" >"$log" 2>&1
  local rc=$?
  local n=0
  grep -E '^test .* \.\.\. (ok|FAILED)$' "$log" >"$work/rust-verdicts"
  while read -r _ name _ verdict; do
    n=$((n + 1))
    if [[ $verdict == ok ]]; then echo "QSD-VM-RESULT ok rust::$name"; else echo "QSD-VM-RESULT fail rust::$name"; fi
  done <"$work/rust-verdicts" # (no process substitution: the guest's /dev lacks /dev/fd)
  if [[ $rc -ne 0 || $n -eq 0 ]]; then
    sed -n '/^failures:$/,/^failures:$/p' "$log" | head -40 | sed 's/^/QSD-VM-LOG /'
    dmesg | tail -25 | sed 's/^/QSD-VM-LOG kernel: /'
    if [[ $n -eq 0 ]]; then
      head -20 "$log" | sed 's/^/QSD-VM-LOG /'
      echo "QSD-VM-RESULT fail rust_kernel_devices (no results, exit $rc)"
    fi
  fi
}

# Tests that run but do not count yet, each with its reason (reported as skipped).
declare -A known_broken=()

for t in ${QSD_VM_TESTS:-test_kernel_devices test_a_failed_test_leaves_nothing_behind rust_kernel_devices test_daemon_nbd_export_through_the_kernel \
  test_qsd_csi_nbd_backend test_daemon_killed_under_a_verifying_writer test_qsd_csi_ublk_backend \
  test_daemon_killed_under_a_verifying_writer_ublk test_ublk_server_killed_under_a_verifying_writer \
  test_auto_picks_the_backend_the_kernel_serves_best test_ublk_grows_a_mounted_ext4_under_a_writer \
  test_ublk_grows_a_mounted_xfs_under_a_writer}; do
  if [[ $t == rust_kernel_devices ]]; then
    run_rust_tests
    left=$(leftovers)
    [[ -z $left ]] || { lines "QSD-VM-LOG " "$left"; echo "QSD-VM-RESULT fail rust_tests_leave_nothing"; }
    teardown >/dev/null 2>&1
    continue
  fi
  if [[ -n ${known_broken[$t]:-} && -z ${QSD_VM_TESTS:-} ]]; then
    echo "QSD-VM-RESULT skip ${t#test_}: ${known_broken[$t]}"
    continue
  fi
  touch "$work/.started"
  ( set -o pipefail; $t ) >"$work/$t.log" 2>&1
  rc=$?
  teardown >>"$work/$t.log" 2>&1
  left=$(leftovers)
  if [[ -n $left ]]; then
    lines "left behind after ${t#test_}: " "$left" >>"$work/$t.log"
    [[ $rc -eq 0 || $rc -eq $SKIP ]] && rc=1
  fi
  grep -a '^QSD-VM-BENCH ' "$work/$t.log" # a benchmark's figures, to the console
  if [[ $rc -eq $SKIP ]]; then
    echo "QSD-VM-RESULT skip ${t#test_}: $(tail -1 "$work/$t.log")"
    continue
  fi
  if [[ $rc -ne 0 ]]; then
    sed 's/^/QSD-VM-LOG /' "$work/$t.log" | tail -20
    find "$work" -name driver.log -newer "$work/.started" | while read -r l; do
      tail -8 "$l" | sed "s|^|QSD-VM-LOG ${l#"$work"/}: |"
    done
    dmesg | tail -15 | sed 's/^/QSD-VM-LOG kernel: /'
  fi
  result "${t#test_}" $rc
done
