"""A small SSH server in this process (paramiko's server side) for the SSH connector's tests:
real host keys, key exchange and public-key auth on 127.0.0.1, commands run with /bin/sh, and
an SFTP subsystem on this machine's files (what uploads use).

    with FakeSSHD(host_key) as sshd:      # sshd.port; sshd.commands: what clients ran
        ...

``drop_on``: a command containing this string makes the server drop the whole connection
while the command runs (a host that goes away mid-step). Only for tests: every public key is
accepted for every user.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading

import paramiko
from paramiko.common import MSG_CHANNEL_REQUEST


class _Server(paramiko.ServerInterface):
    def __init__(self, sshd: FakeSSHD, transport: paramiko.Transport):
        self.sshd, self.transport = sshd, transport
        self.pending: dict[paramiko.Channel, str] = {}

    def get_allowed_auths(self, username):
        return "publickey"

    def check_auth_publickey(self, username, key):
        self.sshd.users.append(username)
        return paramiko.AUTH_SUCCESSFUL

    def check_channel_request(self, kind, chanid):
        return (
            paramiko.OPEN_SUCCEEDED
            if kind == "session"
            else paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED
        )

    def check_channel_pty_request(
        self, channel, term, width, height, pixelwidth, pixelheight, modes
    ):
        return True

    def check_channel_env_request(self, channel, name, value):
        return True

    def check_channel_exec_request(self, channel, command):
        command = command.decode() if isinstance(command, bytes) else command
        self.sshd.commands.append(command)
        self.pending[channel] = command  # run once the request is answered: see _Transport
        return True

    def start_pending(self, channel: paramiko.Channel) -> None:
        command = self.pending.pop(channel, None)
        if command is not None:
            threading.Thread(target=self._execute, args=(channel, command), daemon=True).start()

    def _execute(self, channel, command: str) -> None:
        if self.sshd.drop_on and self.sshd.drop_on in command:
            channel.sendall(b"started\n")
            self.transport.close()  # the host goes away mid-command
            return
        proc = subprocess.run(["/bin/sh", "-c", command], capture_output=True, timeout=60)
        channel.sendall(proc.stdout)
        channel.sendall_stderr(proc.stderr)
        channel.send_exit_status(proc.returncode)
        channel.close()


def _answer_then_start(channel: paramiko.Channel, message: paramiko.Message) -> None:
    paramiko.Channel._handle_request(channel, message)  # sends the exec request's reply
    channel.transport.server_object.start_pending(channel)


class _Transport(paramiko.Transport):
    """paramiko's server answers an exec request after check_channel_exec_request returns: a
    command started there can exit and close its channel before that answer, and the client
    then reads "Channel closed" (a short command, one run in a few hundred). Commands start
    here, after the answer is sent."""

    _channel_handler_table = {
        **paramiko.Transport._channel_handler_table,
        MSG_CHANNEL_REQUEST: _answer_then_start,
    }


class _Handle(paramiko.SFTPHandle):
    def stat(self):
        return paramiko.SFTPAttributes.from_stat(os.fstat(self.writefile.fileno()))

    def chattr(self, attr):
        if attr.st_mode is not None:
            os.chmod(self.filename, attr.st_mode & 0o7777)
        return paramiko.SFTP_OK


class _SFTP(paramiko.SFTPServerInterface):
    """Files on this machine, for the operations stackctl's uploads use."""

    def open(self, path, flags, attr):
        try:
            fd = os.open(path, flags, 0o666)
        except OSError as exc:
            return paramiko.SFTPServer.convert_errno(exc.errno)
        handle = _Handle(flags)
        handle.filename = path
        handle.readfile = handle.writefile = os.fdopen(
            fd, "r+b" if flags & os.O_RDWR else ("wb" if flags & os.O_WRONLY else "rb")
        )
        return handle

    def stat(self, path):
        try:
            return paramiko.SFTPAttributes.from_stat(os.stat(path))
        except OSError as exc:
            return paramiko.SFTPServer.convert_errno(exc.errno)

    lstat = stat

    def chattr(self, path, attr):
        if attr.st_mode is not None:
            os.chmod(path, attr.st_mode & 0o7777)
        return paramiko.SFTP_OK

    def posix_rename(self, oldpath, newpath):
        try:
            os.replace(oldpath, newpath)
        except OSError as exc:
            return paramiko.SFTPServer.convert_errno(exc.errno)
        return paramiko.SFTP_OK

    def remove(self, path):
        os.remove(path)
        return paramiko.SFTP_OK


class FakeSSHD:
    def __init__(self, host_key: paramiko.PKey, drop_on: str | None = None):
        self.host_key, self.drop_on = host_key, drop_on
        self.commands: list[str] = []
        self.users: list[str] = []
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(8)
        self._sock.settimeout(0.1)
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._transports: list[paramiko.Transport] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> FakeSSHD:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
        for transport in self._transports:
            transport.close()
        self._sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            transport = _Transport(conn)
            transport.add_server_key(self.host_key)
            transport.set_subsystem_handler("sftp", paramiko.SFTPServer, _SFTP)
            self._transports.append(transport)
            try:
                transport.start_server(server=_Server(self, transport))
            except (paramiko.SSHException, EOFError, OSError):
                transport.close()  # the client refused our key, or went away
                continue
            threading.Thread(target=self._accept_channels, args=(transport,), daemon=True).start()

    def _accept_channels(self, transport: paramiko.Transport) -> None:
        channels = []  # held: a channel paramiko no longer references is closed when collected
        while transport.is_active() and not self._stop.is_set():
            channel = transport.accept(0.2)
            if channel is not None:
                channels.append(channel)
