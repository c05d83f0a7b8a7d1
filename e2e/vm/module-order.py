#!/usr/bin/env python3
"""Prints, in load order (dependencies first), the module files under MODDIR that the named
modules need, for a kernel package without modules.dep (Debian's depmod runs at install, and
this host has no kmod). Dependencies come from each module's .modinfo "depends=" field; .ko.xz
files are read through lzma. A module with no file is built in (or absent): it is left out and
named on stderr.

usage: module-order.py MODDIR MODULE...
"""
import lzma
import os
import re
import sys


def index(moddir):
    files = {}
    for root, _, names in os.walk(moddir):
        for name in names:
            m = re.fullmatch(r"(.+)\.ko(\.xz)?", name)
            if m:
                files[m.group(1).replace("-", "_")] = os.path.join(root, name)
    return files


def depends(path):
    with (lzma.open(path) if path.endswith(".xz") else open(path, "rb")) as f:
        data = f.read()
    m = re.search(rb"\x00depends=([^\x00]*)\x00", data)
    return [d.decode().replace("-", "_") for d in m.group(1).split(b",") if d] if m else []


def main():
    moddir, wanted = sys.argv[1], sys.argv[2:]
    files = index(moddir)
    order, seen = [], set()

    def visit(name):
        name = name.replace("-", "_")
        if name in seen:
            return
        seen.add(name)
        if name not in files:
            print(f"module-order: {name}: no module file (built in)", file=sys.stderr)
            return
        for dep in depends(files[name]):
            visit(dep)
        order.append(files[name])

    for name in wanted:
        visit(name)
    print("\n".join(order))


main()
