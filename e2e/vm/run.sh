#!/usr/bin/env bash
# Boots Debian's 6.1 kernel under QEMU TCG with the host root shared read-only over 9p and runs
# guest-tests.sh inside it (chrooted into the host tree, so the guest uses this checkout's
# binaries and the host's qemu-storage-daemon). Prints each guest result and ends with the plain
# line "N passed, N failed" (a "vm: N skipped" line before it counts skips). Set
# QSD_CSI_VM_TESTS=test_a,test_b to run only those (known-broken ones included);
# QSD_CSI_VM_RUST_FILTER narrows the Rust device tests.
#
# Assets (kernel, modules, ublk_drv.ko, initramfs) are cached in target/vm/ and rebuilt only when
# missing. Debian's 6.1 config leaves ublk out, so ublk_drv.ko is built out of tree from the
# matching linux-source-6.1 against the matching linux-headers.
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
    echo "0 passed, 1 failed"
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
  9pnet 9pnet_virtio 9p nbd loop crc16 mbcache jbd2 crc32c_generic ext4 libcrc32c xfs ublk_drv)
if [[ ! -f $cache/initramfs.gz || $here/init -nt $cache/initramfs.gz || $cache/ublk_drv.ko -nt $cache/initramfs.gz ]]; then
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

# The guest runs this checkout's binaries from the shared host root: the driver, and the Rust
# device tests (node-plugin/tests/kernel_devices.rs, ignored on the host). Cargo also reports
# the package's binaries it built for the tests; only the test's own executable will do.
(cd "$top" && cargo build --quiet -p qsd-csi --bin qsd-csi)
rust_tests=$(cd "$top" && cargo test --quiet -p qsd-csi-node --test kernel_devices --no-run \
  --message-format=json | grep -o '"executable":"[^"]*/deps/kernel_devices-[^"]*"' | tail -1 \
  | cut -d'"' -f4)
[[ -x $rust_tests ]] || { echo "vm: could not build the Rust device tests" >&2; exit 1; }

log=$cache/console.log
# TCG: the host's /dev/kvm cannot boot stock kernels. The guest powers off when done.
timeout "${QSD_CSI_VM_TIMEOUT:-600}" qemu-system-x86_64 -accel tcg -cpu max -smp 2 -m 2048 \
  -nographic -no-reboot -kernel "$cache/vmlinuz" -initrd "$cache/initramfs.gz" \
  -append "console=ttyS0 panic=-1 quiet qsd.top=$top qsd.tests=${QSD_CSI_VM_TESTS:-all} qsd.rust=$rust_tests qsd.rustfilter=${QSD_CSI_VM_RUST_FILTER:-}" \
  -virtfs "local,path=/,mount_tag=host,security_model=passthrough,readonly=on,multidevs=remap" \
  </dev/null >"$log" 2>&1 || true

passed=$(grep -ac 'QSD-VM-RESULT ok ' "$log" || true)
failed=$(grep -ac 'QSD-VM-RESULT fail ' "$log" || true)
skipped=$(grep -ac 'QSD-VM-RESULT skip ' "$log" || true)
grep -aoE 'QSD-VM-(RESULT|DONE|LOG).*' "$log" || true
if ! grep -aq 'QSD-VM-DONE' "$log"; then
  echo "vm: the guest did not finish; console:" >&2
  tail -40 "$log" >&2
  failed=$((failed + 1))
fi
echo "vm: $skipped skipped"
echo "$passed passed, $failed failed"
[[ $failed -eq 0 && $passed -gt 0 ]]
