"""A token file is trusted only if no other user can change it: its owner is this user or
root, and so is every directory above it, none writable by others (ssh's StrictModes; a
sticky directory such as /tmp passes). A systemd credential is exempt."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from cmuxd.auth import AuthError, server_credentials, write_new_token
from helpers import daemon_command, write_token_file


def written_by(user: tuple[int, int], path) -> str:
    """A 0600 token file created by the other user's own process; the token."""
    uid, gid = user
    token = os.urandom(32).hex()
    script = (f"import os,sys\nos.setgroups([]); os.setgid({gid}); os.setuid({uid})\n"
              "fd=os.open(sys.argv[1],os.O_WRONLY|os.O_CREAT|os.O_EXCL,0o600)\n"
              "os.write(fd,sys.stdin.buffer.read())\n")
    subprocess.run([sys.executable, "-c", script, str(path)], input=(token + "\n").encode(),
                   check=True, timeout=30)
    return token


def private_dir(tmp_path, name="keys"):
    d = tmp_path / name
    d.mkdir(mode=0o700)
    return d


def test_token_file_of_another_user_is_refused(other_user):
    keys = Path(tempfile.mkdtemp(prefix="cmuxd-test-"))  # in /tmp, which the other user reaches
    try:
        os.chmod(keys, 0o1777)  # so the other user can create the file in it
        path = keys / "relay-token"
        token = written_by(other_user, path)
        os.chmod(keys, 0o700)
        with pytest.raises(AuthError) as err:
            server_credentials(path, "r")
    finally:
        shutil.rmtree(keys)
    message = str(err.value)
    assert f"belongs to uid {other_user[0]}" in message and "chown" in message
    assert token not in message


def test_daemon_refuses_another_users_token_file_with_a_sentence(tmp_path, other_user):
    keys = private_dir(tmp_path)
    path = keys / "relay-token"
    token = write_token_file(path)
    os.chown(path, *other_user)
    out = subprocess.run(daemon_command("serve", "--token-file", str(path), "--tcp",
                                        "127.0.0.1:0", "--state-dir", str(tmp_path / "state")),
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1, out
    assert f"belongs to uid {other_user[0]}" in out.stderr
    assert token not in out.stderr + out.stdout


def test_token_in_a_directory_of_another_user_is_refused(tmp_path, other_user):
    keys = private_dir(tmp_path)
    path = keys / "relay-token"
    write_token_file(path)
    os.chown(keys, *other_user)
    with pytest.raises(AuthError, match=f"{keys}, which belongs to uid {other_user[0]}"):
        server_credentials(path, "r")


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o755 | 0o020])
def test_token_in_a_directory_others_can_write_is_refused(tmp_path, mode):
    keys = private_dir(tmp_path)
    path = keys / "relay-token"
    write_token_file(path)
    os.chmod(keys, mode)
    with pytest.raises(AuthError, match=f"run chmod go-w {keys}"):
        server_credentials(path, "r")


def test_an_ancestor_directory_counts_too(tmp_path):
    keys = private_dir(tmp_path)
    inner = keys / "a" / "b"
    inner.mkdir(parents=True, mode=0o700)
    path = inner / "relay-token"
    write_token_file(path)
    os.chmod(keys, 0o777)
    with pytest.raises(AuthError, match=f"lies in {keys},"):
        server_credentials(path, "r")


def test_the_directories_of_a_symlinks_target_are_checked(tmp_path):
    real = private_dir(tmp_path, "real")
    write_token_file(real / "relay-token")
    link = private_dir(tmp_path, "link") / "relay-token"
    link.symlink_to(real / "relay-token")
    assert server_credentials(link, "r").relay_id == "r"
    os.chmod(real, 0o777)
    with pytest.raises(AuthError, match=f"lies in {real},"):
        server_credentials(link, "r")


def test_a_sticky_shared_directory_passes(tmp_path):
    shared = private_dir(tmp_path, "shared")
    os.chmod(shared, 0o1777)
    path = shared / "relay-token"
    write_token_file(path)
    assert server_credentials(path, "r").relay_id == "r"


def test_token_new_refuses_a_directory_others_can_write(tmp_path):
    keys = private_dir(tmp_path)
    os.chmod(keys, 0o777)
    with pytest.raises(AuthError, match="run chmod go-w"):
        write_new_token(keys / "relay-token")
    assert not (keys / "relay-token").exists()
    out = subprocess.run(daemon_command("token", "new", str(keys / "relay-token")),
                         capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "run chmod go-w" in out.stderr, out
    assert not (keys / "relay-token").exists()
    os.chmod(keys, 0o700)
    assert write_new_token(keys / "relay-token") == keys / "relay-token"


def test_token_new_refuses_a_directory_of_another_user(tmp_path, other_user):
    keys = private_dir(tmp_path)
    os.chown(keys, *other_user)
    with pytest.raises(AuthError, match=f"belongs to uid {other_user[0]}"):
        write_new_token(keys / "relay-token")
    assert not (keys / "relay-token").exists()


def test_systemd_credential_passes(tmp_path, other_user):
    """systemd owns $CREDENTIALS_DIRECTORY and shows its ACL as group bits: not our rules."""
    creds = private_dir(tmp_path, "credentials")
    token = write_token_file(creds / "relay-token", 0o440)
    os.chown(creds / "relay-token", *other_user)
    os.chmod(creds, 0o755)
    got = server_credentials(None, "r", env={"CREDENTIALS_DIRECTORY": str(creds)})
    assert got.token == bytes.fromhex(token)
