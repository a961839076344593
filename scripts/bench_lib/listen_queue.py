"""How full a server's listen queues are: what `ss -ltn` shows as Recv-Q / Send-Q.

A client that connects faster than the server accepts overflows the accept queue; the kernel
then drops the SYN and the client retries 1 s later (then 3, 7 s), so a run measures the
retransmit timer instead of the server. The many-pipes clients pace their connects on this.
Read with one sock_diag netlink dump of the listening TCP sockets (no subprocess, no
privileges needed).
"""
import socket
import struct

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
TCP_LISTEN = 10
NLMSG_HEADER = struct.Struct("=IHHII")            # len, type, flags, seq, pid
DIAG_REQUEST = struct.Struct("=BBBBI")            # family, protocol, ext, pad, states
DIAG_SOCKID = struct.Struct("!HH16s16sIQ")        # sport, dport, src, dst, if, cookie
DIAG_MESSAGE_HEAD = struct.Struct("=BBBB")        # family, state, timer, retrans
DIAG_QUEUES = struct.Struct("=III")               # expires, rqueue, wqueue


def listen_queues(port):
    """[(queued, backlog)] for each IPv4 TCP socket listening on `port` (several with
    SO_REUSEPORT); None when sock_diag is unavailable."""
    request = (DIAG_REQUEST.pack(socket.AF_INET, socket.IPPROTO_TCP, 0, 0, 1 << TCP_LISTEN)
               + DIAG_SOCKID.pack(0, 0, bytes(16), bytes(16), 0, 0xFFFFFFFFFFFFFFFF))
    header = NLMSG_HEADER.pack(NLMSG_HEADER.size + len(request), SOCK_DIAG_BY_FAMILY,
                               NLM_F_REQUEST | NLM_F_DUMP, 1, 0)
    queues = []
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as link:
            link.send(header + request)
            while True:
                data = link.recv(65536)
                offset = 0
                while offset + NLMSG_HEADER.size <= len(data):
                    length, kind, _, _, _ = NLMSG_HEADER.unpack_from(data, offset)
                    if kind == NLMSG_DONE:
                        return queues
                    if kind == NLMSG_ERROR or length < NLMSG_HEADER.size:
                        return None
                    body = offset + NLMSG_HEADER.size
                    sport = DIAG_SOCKID.unpack_from(data, body + DIAG_MESSAGE_HEAD.size)[0]
                    if sport == port:
                        _, queued, backlog = DIAG_QUEUES.unpack_from(
                            data, body + DIAG_MESSAGE_HEAD.size + DIAG_SOCKID.size)
                        queues.append((queued, backlog))
                    offset += (length + 3) & ~3
    except OSError:
        return None
