"""The check-in before `jax.distributed.initialize` (engram_jax/rendezvous.py).

Processes are threads here, on loopback: the check-in is plain sockets, so a launch
mistake is caught the same way in-process. Before it, each mistake below waited out
jax's 300 s join and ended in a C++ fatal log (exit 134).
"""
import socket
import threading
import time

import pytest

from engram_jax import rendezvous


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(target, *args):
  """Runs `target(*args)` in a thread; returns (thread, outcome) with outcome[0] the
  return value or the exception once joined."""
  outcome = []

  def run():
    try:
      outcome.append(target(*args))
    except Exception as err:  # noqa: BLE001  the test inspects it
      outcome.append(err)

  thread = threading.Thread(target=run, daemon=True)
  thread.start()
  return thread, outcome


def _outcomes(*started, timeout=30):
  for thread, _ in started:
    thread.join(timeout)
    assert not thread.is_alive(), "a process of the check-in never returned"
  return [outcome[0] for _, outcome in started]


def _gather(address, n, timeout_s=20):
  return _start(lambda: rendezvous.gather(address, n, timeout_s, log=lambda line: None))


def _check_in(address, n, pid, timeout_s=20):
  return _start(rendezvous.check_in, address, n, pid, timeout_s)


def test_all_check_in_then_the_port_is_free_for_jax():
  address = f"127.0.0.1:{_free_port()}"
  clients = [_check_in(address, 3, 1), _check_in(address, 3, 2)]  # before process 0
  time.sleep(0.3)
  assert _outcomes(_gather(address, 3), *clients) == [None, None, None]
  with socket.socket() as jax_coordinator:  # what jax binds next, with SO_REUSEADDR
    jax_coordinator.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    jax_coordinator.bind(("0.0.0.0", int(address.rsplit(":", 1)[1])))


def test_different_num_processes_refuse_every_process_with_one_line():
  address = f"127.0.0.1:{_free_port()}"
  results = _outcomes(_gather(address, 2), _check_in(address, 3, 1))
  for err in results:
    assert isinstance(err, ValueError)
    assert str(err) == ("--num_processes differs between processes: process 1 has 3, "
                        "process 0 has 2; give every process the same --num_processes")


def test_one_process_id_given_twice_refuses_every_process():
  address = f"127.0.0.1:{_free_port()}"
  server = _gather(address, 3)
  first = _check_in(address, 3, 1)
  time.sleep(0.5)  # the first is checked in before the second arrives
  results = _outcomes(server, first, _check_in(address, 3, 1))
  for err in results:
    assert isinstance(err, ValueError) and str(err).startswith(
        "--process_id=1 was given to two processes; give each process its own id, 0..2")


def test_a_process_that_never_starts_is_named_by_every_process():
  address = f"127.0.0.1:{_free_port()}"
  results = _outcomes(_gather(address, 4, timeout_s=1.5), _check_in(address, 4, 2))
  for err in results:
    assert isinstance(err, ValueError)
    assert str(err).startswith("--num_processes=4: after 2 s, processes 1, 3 had not "
                               f"joined at {address}; start them")


def test_no_process_0_is_one_line_naming_the_address():
  address = f"127.0.0.1:{_free_port()}"
  started = time.monotonic()
  with pytest.raises(ValueError, match=rf"--coordinator_address={address}: process 0 did "
                                       r"not answer within 1 s; start process 0 there"):
    rendezvous.check_in(address, 2, 1, 1.0)
  assert time.monotonic() - started < 10
  # a name that does not resolve (yet: a host still starting) is retried, then named
  with pytest.raises(ValueError, match=r"--coordinator_address=no-such-host.invalid:1234: "
                                       r"host 'no-such-host.invalid' did not resolve .* "
                                       r"within 1 s"):
    rendezvous.check_in("no-such-host.invalid:1234", 2, 1, 1.0)


def test_a_port_held_by_a_run_that_started_without_this_process_is_named():
  """A process started late, or twice, used to knock on the running job's coordinator
  (jax's, which answers in HTTP/2) for 300 s, then say "process 0 stopped answering"."""
  with socket.socket() as other:
    other.bind(("127.0.0.1", 0))
    other.listen()
    address = f"127.0.0.1:{other.getsockname()[1]}"

    def answer_in_another_protocol():
      other.settimeout(0.2)
      for _ in range(20):
        try:
          conn, _ = other.accept()
        except OSError:
          continue
        with conn:
          conn.sendall(b"\x00\x00\x06\x04\x00\x00\x00\x00\x00")  # an HTTP/2 frame
    answering = threading.Thread(target=answer_in_another_protocol, daemon=True)
    answering.start()
    with pytest.raises(ValueError, match=r"the port is held by something other than a "
                                         r"process 0 waiting for this one"):
      rendezvous.check_in(address, 2, 1, 1.5)
    answering.join()


def test_a_silent_connection_does_not_hold_up_the_check_in():
  address = f"127.0.0.1:{_free_port()}"
  host, port = rendezvous.split_address(address)
  server = _gather(address, 2, timeout_s=6)
  time.sleep(0.3)
  with socket.create_connection((host, port)):  # connects, says nothing
    started = time.monotonic()
    assert _outcomes(server, _check_in(address, 2, 1)) == [None, None]
    assert time.monotonic() - started < 5


def test_strangers_and_a_restarted_process_do_not_break_the_check_in():
  """A connection that is not a process of the run (a port scan) is dropped; a process
  that died while waiting frees its id for its restart (not 'given to two')."""
  address = f"127.0.0.1:{_free_port()}"
  host, port = rendezvous.split_address(address)
  server = _gather(address, 3)
  time.sleep(0.3)
  with socket.create_connection((host, port)) as stranger:
    stranger.sendall(b"GET / HTTP/1.0\r\n\r\n")
    assert stranger.recv(64) == b""  # closed on it
  died = socket.create_connection((host, port))
  died.sendall(f"{rendezvous.GREETING} 1 3\n".encode())
  time.sleep(0.3)
  died.close()
  results = _outcomes(server, _check_in(address, 3, 1), _check_in(address, 3, 2))
  assert results == [None, None, None]


def test_bad_addresses_and_a_port_in_use_are_one_line():
  for address in ("localhost", "localhost:http", ":1234", "host:70000"):
    with pytest.raises(ValueError, match=r"--coordinator_address=.*: use HOST:PORT"):
      rendezvous.split_address(address)
  with socket.socket() as busy:
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    with pytest.raises(ValueError, match=rf"port {port} is in use on this host"):
      rendezvous.gather(f"127.0.0.1:{port}", 2, 5)


def test_init_distributed_checks_in_before_jax_joins(monkeypatch):
  """The wiring in main: a count mismatch stops both processes before jax is called;
  agreement calls jax with the flags as given."""
  import jax

  from engram_jax import main
  joined = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: joined.append(a))
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  address = f"127.0.0.1:{_free_port()}"
  results = _outcomes(_start(main.init_distributed, "auto", address, 2, 0),
                      _start(main.init_distributed, "auto", address, 3, 1))
  assert all(isinstance(r, ValueError) and "--num_processes differs" in str(r)
             for r in results) and not joined
  address = f"127.0.0.1:{_free_port()}"
  results = _outcomes(_start(main.init_distributed, "auto", address, 2, 0),
                      _start(main.init_distributed, "auto", address, 2, 1))
  assert results == [2, 2]
  assert sorted(joined) == [(address, 2, 0), (address, 2, 1)]
