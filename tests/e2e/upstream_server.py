"""The servers of the upstream namespace (see upstream.py), standard library only.

Run inside the namespace: `python upstream_server.py --addr A --www DIR --cert C --key K
--private P`. Prints `ready` once every socket listens.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import socket
import socketserver
import ssl
import struct
import threading

ZONE_SUFFIXES = (".wild.test",)


def answer_for(name: str, addr: str, private: str) -> str | None:
    """The A record of `name`, or None for NXDOMAIN."""
    name = name.rstrip(".").lower()
    if name == "private.test":
        return private
    if name in ("files.test", "api.test", "pypi.test"):
        return addr
    if any(name.endswith(s) and len(name) > len(s) for s in ZONE_SUFFIXES):
        return addr
    return None


def dns_reply(query: bytes, addr: str, private: str) -> bytes | None:
    if len(query) < 12:
        return None
    qid, flags, qd = struct.unpack("!HHH", query[:6])
    if qd != 1:
        return None
    labels, i = [], 12
    while i < len(query) and query[i] != 0:
        n = query[i]
        labels.append(query[i + 1 : i + 1 + n].decode("ascii", "replace"))
        i += 1 + n
    i += 1
    if i + 4 > len(query):
        return None
    qtype, qclass = struct.unpack("!HH", query[i : i + 4])
    question = query[12 : i + 4]
    name = ".".join(labels)
    a = answer_for(name, addr, private)
    rd = flags & 0x0100
    if a is None:
        header = struct.pack("!HHHHHH", qid, 0x8000 | 0x0400 | rd | 3, 1, 0, 0, 0)
        return header + question
    answers = b""
    count = 0
    if qtype in (1, 255):  # A or ANY
        answers = struct.pack("!HHHLH", 0xC00C, 1, 1, 30, 4) + socket.inet_aton(a)
        count = 1
    header = struct.pack("!HHHHHH", qid, 0x8000 | 0x0400 | rd, 1, count, 0, 0)
    return header + question + answers


class DnsUdp(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        data, sock = self.request
        reply = dns_reply(data, self.server.addr, self.server.private)  # type: ignore[attr-defined]
        if reply:
            sock.sendto(reply, self.client_address)


class DnsTcp(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        head = self.request.recv(2)
        if len(head) < 2:
            return
        (n,) = struct.unpack("!H", head)
        data = b""
        while len(data) < n:
            chunk = self.request.recv(n - len(data))
            if not chunk:
                return
            data += chunk
        reply = dns_reply(data, self.server.addr, self.server.private)  # type: ignore[attr-defined]
        if reply:
            self.request.sendall(struct.pack("!H", len(reply)) + reply)


class Web(http.server.SimpleHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        if self.path == "/host":
            body = (self.headers.get("Host", "") + "\n").encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        super().do_GET()

    def log_message(self, *args) -> None:
        pass


class TcpEcho(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while True:
            data = self.request.recv(65536)
            if not data:
                return
            self.request.sendall(data)


class UdpEcho(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        data, sock = self.request
        sock.sendto(data, self.client_address)


class ThreadingUDP(socketserver.ThreadingMixIn, socketserver.UDPServer):
    allow_reuse_address = True
    daemon_threads = True


class ThreadingTCP(socketserver.ThreadingMixIn, socketserver.TCPServer):
    allow_reuse_address = True
    daemon_threads = True


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--addr", required=True)
    p.add_argument("--www", required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--private", required=True)
    a = p.parse_args()
    servers: list[socketserver.BaseServer] = []
    for cls, handler in ((ThreadingUDP, DnsUdp), (ThreadingTCP, DnsTcp)):
        s = cls((a.addr, 53), handler)
        s.addr, s.private = a.addr, a.private  # type: ignore[attr-defined]
        servers.append(s)
    web = functools.partial(Web, directory=a.www)
    servers.append(http.server.ThreadingHTTPServer((a.addr, 80), web))
    tls = http.server.ThreadingHTTPServer((a.addr, 443), web)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(a.cert, a.key)
    tls.socket = ctx.wrap_socket(tls.socket, server_side=True)
    servers.append(tls)
    servers.append(ThreadingTCP((a.addr, 7), TcpEcho))
    servers.append(ThreadingUDP((a.addr, 7), UdpEcho))
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    print("ready", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
