"""CPU seconds and resident memory of a server's whole process tree.

relayd and nginx are a supervisor/master with forked workers: every figure sums the root
process and all its descendants (psutil children(recursive=True)). CPU of a child that
exited between two samples is lost; the harness samples around each run, so only a worker
that died mid-run could hide CPU (and that already fails the run).
"""
import psutil


def process_tree(root_pid):
    """The root process and all its live descendants (empty if the root is gone)."""
    try:
        root = psutil.Process(root_pid)
        return [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def cpu_seconds(root_pid):
    """User + system CPU seconds used so far by the tree (children already reaped excluded)."""
    total = 0.0
    for proc in process_tree(root_pid):
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def rss_bytes(root_pid):
    """Sum of the tree's resident set sizes (shared pages counted once per process)."""
    total = 0
    for proc in process_tree(root_pid):
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total
