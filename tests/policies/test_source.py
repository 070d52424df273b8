"""PolicyFile: reloads on change; a bad file is rejected, reported, and the old policy stays."""

from __future__ import annotations

import os

import pytest
import yaml

from expertmesh.policies import PolicyError, PolicyFile, StaticPolicy, parse_policy


def write(path, data) -> None:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    st = os.stat(path)  # make the change visible even within one mtime tick
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))


def test_changed_file_is_reloaded(tmp_path, policy_data):
    path = tmp_path / "p.yaml"
    write(path, policy_data())
    reloaded = []
    source = PolicyFile(path, check_interval_s=0, on_reload=reloaded.append)
    first = source.current()
    write(path, policy_data(name="second"))
    assert source.current().name == "second"
    assert source.current().version != first.version
    assert [p.name for p in reloaded] == ["second"]
    assert source.last_error is None


def test_bad_file_keeps_the_old_policy_and_reports_the_error(tmp_path, policy_data):
    path = tmp_path / "p.yaml"
    write(path, policy_data())
    errors: list[PolicyError] = []
    source = PolicyFile(path, check_interval_s=0, on_error=errors.append)
    good = source.current()
    bad = policy_data()
    bad["models"][0]["context_window"] = "big"
    write(path, bad)
    assert source.current() is good
    assert source.last_error is not None
    assert "models[0].context_window" in str(source.last_error)
    assert errors == [source.last_error]
    assert source.reload() is False  # an explicit reload is refused the same way
    write(path, policy_data(name="fixed"))
    assert source.current().name == "fixed" and source.last_error is None


def test_deleted_file_keeps_the_old_policy(tmp_path, policy_data):
    path = tmp_path / "p.yaml"
    write(path, policy_data())
    source = PolicyFile(path, check_interval_s=0)
    good = source.current()
    path.unlink()
    assert source.current() is good and "cannot read" in str(source.last_error)


def test_first_load_must_succeed(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("version: 1\n")
    with pytest.raises(PolicyError):
        PolicyFile(path)


def test_file_is_not_restatted_within_the_check_interval(tmp_path, policy_data):
    path = tmp_path / "p.yaml"
    write(path, policy_data())
    source = PolicyFile(path, check_interval_s=3600)
    write(path, policy_data(name="later"))
    assert source.current().name == "p"
    assert source.reload_if_changed() is True and source.current().name == "later"


def test_static_policy(policy_data):
    p = parse_policy(policy_data())
    assert StaticPolicy(p).current() is p
