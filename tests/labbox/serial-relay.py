#!/usr/bin/env python3
"""Persistent serial relay ("console server") of one lab-in-a-box host.

    serial-relay.py VM_PORT SOL_PORT CONSOLE_FILE

Listens on 127.0.0.1:VM_PORT, where the host's QEMU connects its serial port
(-chardev socket,host=127.0.0.1,port=VM_PORT), and on 127.0.0.1:SOL_PORT,
where the BMC (ipmi_sim's `sol "tcp:127.0.0.1:SOL_PORT"`) connects. Bytes from
the VM go to the BMC side and are appended to CONSOLE_FILE, with no gap
across power cycles (either side may come and go; a new connection replaces
the old one): that file is the ground truth of the console for tests and
benchmarks. Bytes from the BMC side (SOL input) go to the VM. A side that
does not read fast enough loses bytes; the file never waits for it.

Prints "serial-relay ready" once both ports listen. Adapted from
/work/shared/lab-in-a-box/ipmi/serial-relay.py.
"""
import selectors
import signal
import socket
import sys


def main():
    vm_port, sol_port, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    sel = selectors.DefaultSelector()
    console = open(path, "ab", buffering=0)

    def listen(port, tag):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen(4)
        sel.register(s, selectors.EVENT_READ, ("listen", tag))

    listen(vm_port, "vm")
    listen(sol_port, "sol")
    print(f"serial-relay ready vm=127.0.0.1:{vm_port} sol=127.0.0.1:{sol_port} file={path}", flush=True)
    conns = {"vm": None, "sol": None}

    def close(tag):
        c = conns[tag]
        if c is not None:
            sel.unregister(c)
            c.close()
            conns[tag] = None

    while True:
        for key, _ in sel.select():
            kind, tag = key.data
            if kind == "listen":
                c, _ = key.fileobj.accept()
                close(tag)
                # Never block on a slow reader: the console file must keep up.
                c.setblocking(False)
                conns[tag] = c
                sel.register(c, selectors.EVENT_READ, ("conn", tag))
                print(f"serial-relay {tag} connected", flush=True)
                continue
            try:
                data = key.fileobj.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                close(tag)
                print(f"serial-relay {tag} disconnected", flush=True)
                continue
            if tag == "vm":
                console.write(data)
            other = conns["sol" if tag == "vm" else "vm"]
            if other is not None:
                try:
                    other.send(data)  # what does not fit now is dropped
                except OSError:
                    pass


if __name__ == "__main__":
    main()
