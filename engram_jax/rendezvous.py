"""Every process of a run checks in with process 0 before `jax.distributed` joins them.

jax's own join cannot tell a launch mistake from a slow start: processes given
different `--num_processes`, two given one `--process_id`, or fewer started than
counted all wait out the join timeout and end in jax's C++ fatal log (exit 134).
So process 0 first listens on the coordinator's port itself, hears from every other
process (its id and its count), and then either releases them all or refuses them
all with one line naming the flag; it closes the port before jax's coordinator binds
it. Only the standard library: this runs before jax is set up.
"""
from __future__ import annotations

import errno
import socket
import sys
import time

GREETING = "engram_jax-join/1"
_LINE_BYTES = 256
_GREETING_TIMEOUT_S = 2.0  # a connection silent this long is not ours (they send at once)
_CLOSE_TIMEOUT_S = 10.0  # for the released to close their end
_POLL_S = 0.5


def split_address(address: str) -> tuple[str, int]:
  """`HOST:PORT` (IPv6 hosts in brackets) as (host, port), or one line naming the flag."""
  host, _, port_text = address.rpartition(":")
  try:
    port = int(port_text)
  except ValueError:
    port = -1
  if not host or not 0 < port < 65536:
    raise ValueError(f"--coordinator_address={address!r}: use HOST:PORT")
  return host.strip("[]"), port


def _port_in_use(address: str, port: int) -> ValueError:
  return ValueError(f"--coordinator_address={address}: port {port} is in use on this host "
                    "(another run's coordinator?); choose another port for every process")


def listen(address: str) -> socket.socket:
  """A socket listening on `address`'s port on every interface, where jax's coordinator
  will listen; SO_REUSEADDR as jax's (a port in TIME_WAIT after a run is free)."""
  _, port = split_address(address)
  for family, anywhere in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
    try:
      sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError:
      continue  # no IPv6 here
    try:
      sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
      if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # IPv4 peers too
      sock.bind((anywhere, port))
      sock.listen(64)
      return sock
    except OSError as err:
      sock.close()
      if err.errno == errno.EADDRINUSE:
        raise _port_in_use(address, port) from None
      if family == socket.AF_INET:
        raise ValueError(f"--coordinator_address={address}: cannot listen on port "
                         f"{port} ({err.strerror}); choose another port") from None
  raise ValueError(f"--coordinator_address={address}: this host has no TCP sockets")


def _read_line(conn: socket.socket, timeout_s: float) -> str | None:
  """One line: up to its newline, or what came before the peer closed or went silent
  (another protocol's bytes: jax's coordinator answers in HTTP/2); None when nothing
  came at all."""
  conn.settimeout(max(timeout_s, 0.01))
  data = b""
  try:
    while b"\n" not in data and len(data) < _LINE_BYTES:
      chunk = conn.recv(_LINE_BYTES)
      if not chunk:
        break
      data += chunk
  except OSError:  # silent past the timeout, or reset: what came so far is the answer
    pass
  if not data:
    return None
  return data.split(b"\n", 1)[0].decode("utf-8", "replace")


def _alive(conn: socket.socket) -> bool:
  """False once the peer has closed (a process that died while waiting)."""
  try:
    conn.setblocking(False)
    return conn.recv(1, socket.MSG_PEEK) != b""
  except BlockingIOError:
    return True  # nothing to read: still connected
  except OSError:
    return False
  finally:
    conn.setblocking(True)


def _send(conn: socket.socket, line: str) -> bool:
  try:
    conn.sendall((line + "\n").encode())
    return True
  except OSError:
    return False


def _refuse_all(conns, reason: str) -> ValueError:
  for conn in conns:
    _send(conn, "refused " + reason)
  return ValueError(reason)


def gather(address: str, num_processes: int, timeout_s: float, *,
           log=lambda line: print(line, file=sys.stderr, flush=True)) -> None:
  """Process 0: waits for processes 1..N-1 to check in, then releases them.

  Raises ValueError (one line) when they disagree on the count, two share an id, or
  not all have come within `timeout_s`; every process that checked in gets the same
  line. Returns once all have read the release and closed, with the port closed."""
  listener = listen(address)
  members: dict[int, socket.socket] = {}
  deadline = time.monotonic() + timeout_s
  try:
    listener.settimeout(_POLL_S)
    while True:
      for pid in [pid for pid, c in members.items() if not _alive(c)]:
        members.pop(pid).close()  # it died waiting; its id is free for a restart
      if len(members) == num_processes - 1:
        break
      if time.monotonic() > deadline:
        missing = sorted(set(range(1, num_processes)) - set(members))
        raise _refuse_all(members.values(), (
            f"--num_processes={num_processes}: after {timeout_s:.0f} s, process"
            f"{'es' if len(missing) > 1 else ''} {', '.join(map(str, missing))} had not "
            f"joined at {address}; start them, or give every process the --num_processes "
            "that matches the processes started"))
      try:
        conn, _ = listener.accept()
      except (socket.timeout, InterruptedError):
        continue
      fields = (_read_line(conn, min(_GREETING_TIMEOUT_S, max(
          deadline - time.monotonic(), 0.1))) or "").split()
      if (len(fields) != 3 or fields[0] != GREETING
          or not all(f.isdigit() for f in fields[1:])):
        conn.close()  # not one of ours (a port scan, another tool): keep waiting
        continue
      pid, count = int(fields[1]), int(fields[2])
      if count != num_processes:
        conn_list = [*members.values(), conn]
        raise _refuse_all(conn_list, (
            f"--num_processes differs between processes: process {pid} has {count}, "
            f"process 0 has {num_processes}; give every process the same --num_processes"))
      if pid in members and not _alive(members[pid]):
        members.pop(pid).close()  # restarted after dying while it waited
      if not 0 < pid < num_processes:
        raise _refuse_all([*members.values(), conn], (
            f"--process_id={pid} is outside 1..{num_processes - 1} for the processes "
            f"other than process 0 (--num_processes={num_processes}); give each its own"))
      if pid in members:
        raise _refuse_all([*members.values(), conn], (
            f"--process_id={pid} was given to two processes; give each process its own "
            f"id, 0..{num_processes - 1} (0 is the one at {address})"))
      members[pid] = conn
      log(f"distributed: process {pid} checked in ({len(members) + 1} of {num_processes})")
    released = [c for c in members.values() if _send(c, "go")]
    for conn in released:  # they close first: no TIME_WAIT on the port jax binds next
      _read_line(conn, _CLOSE_TIMEOUT_S)
  finally:
    for conn in members.values():
      conn.close()
    listener.close()


def check_in(address: str, num_processes: int, process_id: int, timeout_s: float) -> None:
  """Processes 1..N-1: checks in with process 0 and waits for its release.

  Retries while process 0 is not yet listening (or its host's name not yet known);
  raises ValueError (one line) with process 0's refusal, or when no process 0 has
  answered within `timeout_s`, saying what answered instead."""
  host, port = split_address(address)
  deadline = time.monotonic() + timeout_s
  last = "process 0 did not answer"
  while True:
    left = deadline - time.monotonic()
    if left <= 0:
      raise ValueError(f"--coordinator_address={address}: {last} within "
                       f"{timeout_s:.0f} s; start process 0 there first, or fix the "
                       "address on every process")
    try:
      conn = socket.create_connection((host, port), timeout=min(left, 5.0))
    except socket.gaierror as err:  # a name that may appear once process 0's host is up
      last = f"host {host!r} did not resolve ({err.strerror})"
      time.sleep(min(_POLL_S, max(left, 0)))
      continue
    except OSError:  # nothing listens (yet): what the deadline reports, unless it changes
      last = "process 0 did not answer"
      time.sleep(min(_POLL_S, max(left, 0)))
      continue
    with conn:
      if not _send(conn, f"{GREETING} {process_id} {num_processes}"):
        time.sleep(_POLL_S)  # closed on us at once: try again, not in a busy loop
        continue
      # checked in: process 0 answers by its own deadline (or its connection ends)
      reply = _read_line(conn, timeout_s + _CLOSE_TIMEOUT_S)
    if reply == "go":
      return
    if reply is not None and reply.startswith("refused "):
      raise ValueError(reply[len("refused "):])
    if reply is None:  # process 0 went away (a restart?): try again
      last = "process 0 stopped answering"
    else:
      last = ("the port is held by something other than a process 0 waiting for this "
              "one (a run that already started without it, or another program)")
    time.sleep(_POLL_S)
