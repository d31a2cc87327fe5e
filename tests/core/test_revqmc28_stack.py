"""rev-qmc28: the graph-walk bound (scale27's ``walk.walked``) in a thread is the thread's own
stack. ``_stack_bytes`` took ``threading.stack_size()`` (the size for threads started from
then on, not this one's) or else the stack limit, and no bound where that is unlimited;
glibc gives a thread 2 MiB there (its default where ``RLIMIT_STACK`` is unlimited): under
``ulimit -s unlimited`` (the way out the ``GraphTooDeep`` message names) a divergence of a
10^4-step loop called in a thread crashed the process (SIGSEGV) when the walked graph was
freed. The stack is now asked of the C library (``pthread_getattr_np``).
"""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from torchdiv._core import walk


def _in_a_thread(stack: int, then: int) -> int | None:
    """``walk._stack_bytes()`` in a thread started with a ``stack``-byte stack, asked after
    ``threading.stack_size(then)`` (another size for later threads)."""
    found: list[int | None] = []
    before = threading.stack_size(stack)
    try:
        event = threading.Event()

        def body() -> None:
            event.wait()
            found.append(walk._stack_bytes())

        thread = threading.Thread(target=body)
        thread.start()
        threading.stack_size(then)
        event.set()
        thread.join()
    finally:
        threading.stack_size(before)
    return found[0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pthread_getattr_np: Linux")
def test_a_thread_s_bound_is_its_own_stack() -> None:
    """A thread of 1 MiB asked after later threads were set to 64 MiB: its own 1 MiB (the
    C library may round it up by a guard page or so), not 64 (a bound 64x too high)."""
    found = _in_a_thread(2**20, 64 * 2**20)
    assert found is not None
    assert 2**20 <= found < 2**20 + 2**16


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ulimit, glibc's default")
def test_a_deep_loop_in_a_thread_under_an_unlimited_stack_does_not_crash() -> None:
    """``ulimit -s unlimited`` then a thread of glibc's default stack: the third call's walk
    of a 10^4-step loop's graph made its deletion overflow that stack (SIGSEGV, exit -11)."""
    script = (
        "import threading, torch, torchdiv\n"
        "cell = torch.nn.Linear(4, 4)\n"
        "def f(h):\n"
        "    for _ in range(10_000):\n"
        "        h = h + 0.01 * torch.tanh(cell(h))\n"
        "    return h\n"
        "def work():\n"
        "    x = torch.randn(8, 4)\n"
        "    for _ in range(3):\n"
        "        torchdiv.divergence(f, x)\n"
        "thread = threading.Thread(target=work)\n"
        "thread.start()\n"
        "thread.join()\n"
        "print('ok')\n"
    )
    unlimited = subprocess.run(["bash", "-c", "ulimit -s unlimited"], check=False)
    if unlimited.returncode != 0:
        pytest.skip("the stack limit cannot be raised here")
    command = f'ulimit -s unlimited && exec {sys.executable} -c "$0"'
    run = subprocess.run(
        ["bash", "-c", command, script], capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "ok"
