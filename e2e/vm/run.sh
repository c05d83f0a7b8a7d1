#!/usr/bin/env bash
# Boots each kernel of the matrix under QEMU TCG with the host root shared read-only over 9p and
# runs guest-tests.sh inside it (chrooted into the host tree, so the guest uses this checkout's
# binaries and the host's qemu-storage-daemon):
#   bookworm  Debian bookworm's 6.1 (ublk_drv.ko built out of tree: its config leaves ublk out);
#   newest    the newest Debian kernel in trixie-backports (7.3 when written; ublk and nbd in
#             tree), from a private apt list under the cache, never the host's sources.
# Prints each guest result prefixed with its kernel, a line "vm (KERNEL): N passed, N failed"
# per kernel, then the summary line "vm: N passed, N failed, N skipped". Set
# QSD_CSI_VM_KERNELS="bookworm" (or "newest") to boot one; QSD_CSI_VM_TESTS=test_a,test_b to run
# only those (known-broken ones included); QSD_CSI_VM_RUST_FILTER narrows the Rust device tests.
#
# Assets (kernels, modules, initramfs) are cached in target/vm/ (the newest under
# target/vm/newest/) and rebuilt only when missing.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
cache=${QSD_CSI_VM_CACHE:-$top/target/vm}
mkdir -p "$cache"

need=()
if ! command -v qemu-system-x86_64 >/dev/null; then
  # Installing Debian's qemu-system-x86 would replace a newer qemu-utils already on the host.
  have=$(dpkg-query -W -f '${Version}' qemu-utils 2>/dev/null || true)
  want=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
  if [[ -n $have && $have != "$want" ]]; then
    echo "vm: qemu-utils $have is not Debian's $want; install a matching qemu-system-x86_64 first" >&2
    echo "vm: 0 passed, 1 failed, 0 skipped"
    exit 1
  fi
  need+=(qemu-system-x86)
fi
[[ -x /bin/busybox ]] && /bin/busybox --list | grep -qx insmod || need+=(busybox-static)
command -v nbd-client >/dev/null || need+=(nbd-client)
command -v cpio >/dev/null || need+=(cpio)
if ((${#need[@]})); then
  apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# Debian bookworm's 6.1: its newest kernel image, ublk_drv.ko built for it, the initramfs.
# Sets $assets to their directory: $cache itself (as before the matrix).
prepare_bookworm() {
  # The newest Debian 6.1 kernel image package.
  if [[ ! -f $cache/vmlinuz ]]; then
    pkg=$(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64$' | awk '{print $1}' | sort -V | tail -1)
    [[ -n $pkg ]] || { echo "vm: no linux-image-6.1.0-*-amd64 package found" >&2; exit 1; }
    (cd "$cache" && rm -rf deb root && mkdir deb && cd deb && apt-get download -q "$pkg" 2>/dev/null)
    dpkg -x "$cache"/deb/*.deb "$cache/root"
    cp "$cache"/root/boot/vmlinuz-* "$cache/vmlinuz"
  fi

  # ublk_drv.ko for exactly that kernel: its source from linux-source-6.1 of the same version, built
  # against linux-headers of the same ABI.
  if [[ ! -f $cache/ublk_drv.ko ]]; then
    image=$(dpkg-deb -f "$cache"/deb/linux-image-*.deb Package)
    version=$(dpkg-deb -f "$cache"/deb/linux-image-*.deb Version)
    abi=${image#linux-image-}
    kb=$cache/ublk-build
    rm -rf "$kb" && mkdir -p "$kb/deb" "$kb/src"
    (cd "$kb/deb" && apt-get download -q "linux-source-6.1=$version" "linux-headers-$abi=$version" \
      "linux-headers-${abi%-amd64}-common=$version" "linux-kbuild-6.1=$version" 2>/dev/null)
    for d in "$kb"/deb/*.deb; do dpkg -x "$d" "$kb/root"; done
    tar -xf "$kb"/root/usr/src/linux-source-6.1.tar.xz -C "$kb" \
      linux-source-6.1/drivers/block/ublk_drv.c linux-source-6.1/include/uapi/linux/ublk_cmd.h
    cp "$kb/linux-source-6.1/drivers/block/ublk_drv.c" "$kb/src/"
    mkdir -p "$kb/src/include/uapi/linux"
    cp "$kb/linux-source-6.1/include/uapi/linux/ublk_cmd.h" "$kb/src/include/uapi/linux/"
    # shellcheck disable=SC2016 # make expands $(src)
    printf 'obj-m := ublk_drv.o\nccflags-y := -I$(src)/include\n' >"$kb/src/Kbuild"
    # The headers' Makefile includes the common headers by their installed path: point it at ours.
    headers=$kb/root/usr/src/linux-headers-$abi
    sed -i "s|^include /usr/src/|include $kb/root/usr/src/|" "$headers/Makefile"
    make -s -C "$headers" M="$kb/src" modules >"$kb/build.log" 2>&1 \
      || { echo "vm: building ublk_drv.ko failed:" >&2; tail -20 "$kb/build.log" >&2; exit 1; }
    cp "$kb/src/ublk_drv.ko" "$cache/ublk_drv.ko"
    rm -rf "$kb"
  fi

  # Modules in load order: virtio and 9p for the shared root, then block and filesystems.
  modules=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci netfs fscache
    9pnet 9pnet_virtio 9p nbd loop fuse crc16 mbcache jbd2 crc32c_generic ext4 libcrc32c xfs ublk_drv)
  if [[ ! -f $cache/initramfs.gz || $here/init -nt $cache/initramfs.gz || $here/run.sh -nt $cache/initramfs.gz ||
    $cache/ublk_drv.ko -nt $cache/initramfs.gz ]]; then
    rm -rf "$cache/initramfs" && mkdir -p "$cache"/initramfs/{bin,modules,proc,sys,dev,host}
    cp /bin/busybox "$cache/initramfs/bin/busybox"
    for m in "${modules[@]}"; do
      f=$(find "$cache"/root/lib/modules/*/kernel "$cache/ublk_drv.ko" -name "$m.ko" | head -1)
      [[ -n $f ]] || { echo "vm: module $m not in the kernel package" >&2; exit 1; }
      cp "$f" "$cache/initramfs/modules/"
    done
    printf '%s\n' "${modules[@]}" >"$cache/initramfs/modules/order"
    cp "$here/init" "$cache/initramfs/init"
    chmod +x "$cache/initramfs/init"
    (cd "$cache/initramfs" && find . | cpio -o -H newc --quiet | gzip -1 >"$cache/initramfs.gz")
  fi
  assets=$cache
}

# The newest kernel in trixie-backports: linux-binary-* (vmlinuz) and linux-modules-* (xz
# modules, ublk and nbd in tree), fetched with a private apt list so the host's sources are
# untouched; modules picked with their dependencies by module-order.py and decompressed for
# busybox's insmod. Sets $assets to their directory.
prepare_newest() {
  local nc=$cache/newest
  mkdir -p "$nc"
  if [[ ! -f $nc/vmlinuz ]]; then
    local apt=$nc/apt
    rm -rf "$apt" "$nc/root" "$nc/deb" && mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial" "$nc/deb"
    echo "deb http://deb.debian.org/debian trixie-backports main" >"$apt/sources.list"
    local opts=(-o "Dir::Etc::SourceList=$apt/sources.list" -o Dir::Etc::SourceParts=/nonexistent
      -o "Dir::State::Lists=$apt/lists" -o "Dir::Cache=$apt/cache" -o Debug::NoLocking=1
      -o APT::Sandbox::User=root)
    apt-get "${opts[@]}" update -qq >&2
    local binary
    binary=$(apt-cache "${opts[@]}" search --names-only '^linux-binary-[0-9.]+\+deb[0-9]+-amd64$' |
      awk '{print $1}' | sort -V | tail -1)
    [[ -n $binary ]] || { echo "vm: no linux-binary-*-amd64 in trixie-backports" >&2; return 1; }
    (cd "$nc/deb" && apt-get "${opts[@]}" download -q "$binary" "${binary/linux-binary-/linux-modules-}" >&2)
    for d in "$nc"/deb/*.deb; do dpkg -x "$d" "$nc/root"; done
    local version=${binary#linux-binary-}
    cp "$nc/root/usr/lib/modules/$version/vmlinuz" "$nc/vmlinuz.tmp"
    echo "$version" >"$nc/version"
    rm -rf "$apt" "$nc/deb"
    mv "$nc/vmlinuz.tmp" "$nc/vmlinuz"
  fi
  if [[ ! -f $nc/initramfs.gz || $here/init -nt $nc/initramfs.gz || $here/run.sh -nt $nc/initramfs.gz ]]; then
    local moddir; moddir=$nc/root/usr/lib/modules/$(cat "$nc/version")
    # FUSE (the fuse backend) is a module on some kernels and built in on others.
    local roots=(virtio_pci 9pnet_virtio 9p nbd loop ext4 xfs ublk_drv)
    [[ -n $(find "$moddir" -name 'fuse.ko*' | head -1) ]] && roots+=(fuse)
    rm -rf "$nc/initramfs" && mkdir -p "$nc"/initramfs/{bin,modules,proc,sys,dev,host}
    cp /bin/busybox "$nc/initramfs/bin/busybox"
    local f name
    : >"$nc/initramfs/modules/order"
    for f in $(python3 "$here/module-order.py" "$moddir" "${roots[@]}"); do
      name=$(basename "$f"); name=${name%.xz}; name=${name%.ko}
      case $f in
        *.xz) python3 -c 'import lzma, sys; sys.stdout.buffer.write(lzma.open(sys.argv[1]).read())' \
          "$f" >"$nc/initramfs/modules/$name.ko" ;;
        *) cp "$f" "$nc/initramfs/modules/$name.ko" ;;
      esac
      echo "$name" >>"$nc/initramfs/modules/order"
    done
    cp "$here/init" "$nc/initramfs/init"
    chmod +x "$nc/initramfs/init"
    (cd "$nc/initramfs" && find . | cpio -o -H newc --quiet | gzip -1 >"$nc/initramfs.gz")
  fi
  assets=$nc
}

# The guest runs this checkout's binaries from the shared host root: the driver, and the Rust
# device tests (node-plugin/tests/kernel_devices.rs, ignored on the host). Cargo also reports
# the package's binaries it built for the tests; only the test's own executable will do.
(cd "$top" && cargo build --quiet -p qsd-csi --bin qsd-csi)
# The data-path benchmark measures the optimised build (the ublk server runs in the plugin).
if [[ ${QSD_CSI_VM_TESTS:-} == *bench_datapath* ]]; then
  (cd "$top" && cargo build --quiet --release -p qsd-csi --bin qsd-csi)
fi
rust_tests=$(cd "$top" && cargo test --quiet -p qsd-csi-node --test kernel_devices --no-run \
  --message-format=json | grep -o '"executable":"[^"]*/deps/kernel_devices-[^"]*"' | tail -1 \
  | cut -d'"' -f4)
[[ -x $rust_tests ]] || { echo "vm: could not build the Rust device tests" >&2; exit 1; }

# Boots the kernel whose assets are in $2 (vmlinuz, initramfs.gz), labelled $1, and adds its
# results to the totals. TCG: the host's /dev/kvm cannot boot stock kernels. The guest powers off
# when done.
total_passed=0 total_failed=0 total_skipped=0
boot() {
  local label=$1 assets=$2 log=$2/console.log
  timeout "${QSD_CSI_VM_TIMEOUT:-900}" qemu-system-x86_64 -accel tcg -cpu max -smp 2 -m 2048 \
    -nographic -no-reboot -kernel "$assets/vmlinuz" -initrd "$assets/initramfs.gz" \
    -append "console=ttyS0 panic=-1 quiet qsd.top=$top qsd.tests=${QSD_CSI_VM_TESTS:-all} qsd.rust=$rust_tests qsd.rustfilter=${QSD_CSI_VM_RUST_FILTER:-} qsd.benchseconds=${QSD_CSI_BENCH_SECONDS:-5}" \
    -virtfs "local,path=/,mount_tag=host,security_model=passthrough,readonly=on,multidevs=remap" \
    </dev/null >"$log" 2>&1 || true
  local passed failed skipped
  passed=$(grep -ac 'QSD-VM-RESULT ok ' "$log" || true)
  failed=$(grep -ac 'QSD-VM-RESULT fail ' "$log" || true)
  skipped=$(grep -ac 'QSD-VM-RESULT skip ' "$log" || true)
  grep -aoE 'QSD-VM-(RESULT|DONE|LOG).*' "$log" | sed "s/^/($label) /" || true
  # Benchmark figures, as the host benchmark prints them.
  grep -aoE 'QSD-VM-BENCH .*' "$log" | sed 's/^QSD-VM-BENCH //' || true
  if ! grep -aq 'QSD-VM-DONE' "$log"; then
    echo "vm ($label): the guest did not finish; console:" >&2
    tail -40 "$log" >&2
    failed=$((failed + 1))
  fi
  ((passed > 0)) || failed=$((failed + 1))
  echo "vm ($label): $passed passed, $failed failed"
  total_passed=$((total_passed + passed)) total_failed=$((total_failed + failed))
  total_skipped=$((total_skipped + skipped))
}

for kernel in ${QSD_CSI_VM_KERNELS:-bookworm newest}; do
  case $kernel in
    bookworm) prepare_bookworm >&2 ;;
    newest) prepare_newest >&2 ;;
    *) echo "vm: unknown kernel $kernel (bookworm or newest)" >&2; exit 1 ;;
  esac
  # shellcheck disable=SC2012 # one directory, named by the kernel's version
  version=$(basename "$(cd "$assets" && ls -d root/usr/lib/modules/* root/lib/modules/* 2>/dev/null | head -1)")
  boot "$(echo "$version" | grep -oE '^[0-9]+\.[0-9]+')" "$assets"
done
echo "vm: $total_passed passed, $total_failed failed, $total_skipped skipped"
[[ $total_failed -eq 0 && $total_passed -gt 0 ]]
