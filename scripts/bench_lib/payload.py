"""Random payload files, made once per size and shared by every server and repeat."""
import hashlib
import os

WRITE_BLOCK_BYTES = 4 << 20


class Payload:
    """A file of `size` random bytes and its sha256 hex digest."""

    def __init__(self, path, size, sha256):
        self.path, self.size, self.sha256 = path, size, sha256

    @classmethod
    def create(cls, directory, size):
        path = os.path.join(directory, f"payload-{size}.bin")
        digest = hashlib.sha256()
        with open(path, "wb") as out:
            left = size
            while left:
                block = os.urandom(min(WRITE_BLOCK_BYTES, left))
                digest.update(block)
                out.write(block)
                left -= len(block)
        os.chmod(path, 0o644)  # nginx workers may run as another user
        return cls(path, size, digest.hexdigest())


class PayloadCache:
    """Payloads by size inside one temporary directory."""

    def __init__(self, directory):
        self.directory = directory
        self._by_size = {}

    def get(self, size):
        if size not in self._by_size:
            self._by_size[size] = Payload.create(self.directory, size)
        return self._by_size[size]
