"""The control channel on a real SOCK_SEQPACKET socketpair: messages batch into datagrams and
descriptors travel with the messages that carry them, also when the receiving process is out
of descriptors (real EMFILE, from the soft limit)."""
from __future__ import annotations

import os
import resource
import socket

from relayd import control


def channel_pair() -> tuple[control.Channel, control.Channel]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for s in (a, b):
        s.setblocking(False)
    return (control.Channel(a, lambda: None, lambda on: None),
            control.Channel(b, lambda: None, lambda on: None))


def inode(fd: int) -> int:
    return os.fstat(fd).st_ino


def test_a_batch_arrives_in_order_with_each_descriptor_on_its_carrier():
    sender, receiver = channel_pair()
    socks = [socket.socketpair() for _ in range(3)]
    try:
        sent = [control.Ready(1)]
        for i, (mine, _) in enumerate(socks):
            sent.append(control.AttachReceiver(i, 0, 10 + i, "1.1", os.dup(mine.fileno())))
            sent.append(control.Released(i, 0, "sender"))
        for m in sent:
            sender.send(m)
        assert sender.flush()
        got = receiver.receive()
        assert [type(m) for m in got] == [type(m) for m in sent]
        carriers = [m for m in got if isinstance(m, control.AttachReceiver)]
        assert [inode(m.fd) for m in carriers] == [inode(mine.fileno()) for mine, _ in socks]
        for m in carriers:
            os.close(m.fd)
    finally:
        for pair in socks:
            for s in pair:
                s.close()
        sender.close()
        receiver.close()


def test_a_descriptor_lost_to_emfile_arrives_as_minus_one_never_as_another_of_ours():
    """The kernel truncates the descriptors (MSG_CTRUNC) when the receiver has no free
    number: the message must say the socket is gone (fd -1). Before, it kept the number the
    sender knew the socket by, which in the receiver is some other descriptor of its own
    (a worker then closed its own control channel, or wrapped a pipe as a socket)."""
    sender, receiver = channel_pair()
    mine, theirs = socket.socketpair()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        number = os.dup(mine.fileno())
        mine.close()                                  # the channel holds the only copy
        sender.send(control.AttachReceiver(3, 1, 7, "1.1", number))
        sender.send(control.Released(3, 1, "sender"))
        assert sender.flush()                         # sent, and the sender's copy closed
        lowest_free = os.dup(0)
        os.close(lowest_free)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
        try:
            got = receiver.receive()
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert got == [control.AttachReceiver(3, 1, 7, "1.1", -1),
                       control.Released(3, 1, "sender")]
        # The socket's other end sees it gone: no process holds it any more.
        theirs.settimeout(5)
        assert theirs.recv(1) == b""
    finally:
        mine.close()
        theirs.close()
        sender.close()
        receiver.close()
