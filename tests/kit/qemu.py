"""Boot a raw disk image in QEMU and wait for its boot sector's line on the first serial port.

The one boot that the tests, the demo and the benches share. COM1 is QEMU's stdout, a pipe read as it fills,
so the wait ends on the event itself: the line, QEMU's exit, or the deadline, whichever comes first.
"""

import os
import selectors
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

QEMU = "qemu-system-x86_64"


@dataclass(frozen=True, slots=True)
class Boot:
    """What one boot showed: COM1's output, QEMU's own, and how long the line took (None: it never came)."""

    serial: str
    output: str
    seconds: float | None
    exit_status: int | None  # None: QEMU was still running when the wait ended (and was then killed)

    def failure(self) -> str:
        """Say why the line did not come, with what COM1 and QEMU said."""
        exited = f"QEMU exited with {self.exit_status}"
        why = "no line before the deadline" if self.exit_status is None else exited
        return f"{why}; COM1: {self.serial!r}; QEMU: {self.output.strip()!r}"


def kvm_usable() -> bool:
    """Return whether this process can open /dev/kvm for QEMU's `-accel kvm`."""
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC))
    except OSError:
        return False
    return True


def boot_command(image: Path | str, qemu: str = QEMU) -> list[str]:
    """Return the QEMU command line that boots the raw `image` read-only, COM1 on its stdout.

    `-nodefaults` leaves out the VGA card, the network card and the CD drive, so the BIOS boots
    straight from the one disk; `-no-reboot` makes a triple fault end QEMU instead of looping.
    """
    return [
        qemu,
        *("-accel", "kvm" if kvm_usable() else "tcg", "-m", "32", "-nodefaults", "-display", "none"),
        *("-no-reboot", "-serial", "stdio", "-monitor", "none"),
        *("-drive", f"file={str(image).replace(',', ',,')},format=raw,if=virtio,readonly=on"),
    ]


def boot(image: Path | str, expected: str, timeout: float, qemu: str = QEMU) -> Boot:
    """Boot `image` until `expected` is on COM1, QEMU exits or `timeout` seconds pass; then stop QEMU."""
    start = time.perf_counter()
    process = subprocess.Popen(
        boot_command(image, qemu), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    serial, output, wanted = bytearray(), bytearray(), expected.encode()
    seconds: float | None = None
    deadline = start + timeout
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ, serial)
            selector.register(process.stderr, selectors.EVENT_READ, output)
            while seconds is None and selector.get_map() and (left := deadline - time.perf_counter()) > 0:
                for key, _ in selector.select(left):
                    if chunk := os.read(key.fd, 65536):
                        key.data.extend(chunk)
                    else:
                        selector.unregister(key.fileobj)
                if wanted in serial:
                    seconds = time.perf_counter() - start
        exit_status = process.poll()
    finally:
        process.kill()
        rest_serial, rest_output = process.communicate()
    text = (serial + rest_serial).decode(errors="replace")
    return Boot(text, (output + rest_output).decode(errors="replace"), seconds, exit_status)
