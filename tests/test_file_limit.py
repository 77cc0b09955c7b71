"""A node raises its open-file limit to what its connection settings allow, within the hard limit."""

from __future__ import annotations

import resource

import pytest

from zstack_mn import file_limit
from zstack_mn.config import load_settings


class FakeLimits:
    def __init__(self, soft: int, hard: int, refuse: bool = False) -> None:
        self.soft, self.hard, self.refuse = soft, hard, refuse

    def get(self, which: int) -> tuple[int, int]:
        assert which == resource.RLIMIT_NOFILE
        return self.soft, self.hard

    def set(self, which: int, limits: tuple[int, int]) -> None:
        assert which == resource.RLIMIT_NOFILE
        if self.refuse:
            raise ValueError("not allowed")
        self.soft, self.hard = limits


@pytest.fixture
def limits(monkeypatch: pytest.MonkeyPatch) -> FakeLimits:
    fake = FakeLimits(1024, 4096)
    monkeypatch.setattr(resource, "getrlimit", fake.get)
    monkeypatch.setattr(resource, "setrlimit", fake.set)
    return fake


def test_the_defaults_need_more_than_a_common_soft_limit() -> None:
    needed = file_limit.files_needed(load_settings(None, {}))
    assert needed > 1024
    assert needed >= 2_000 + 2_000


def test_the_soft_limit_is_raised_to_what_is_needed(limits: FakeLimits) -> None:
    assert file_limit.raise_file_limit(3000) == 3000
    assert (limits.soft, limits.hard) == (3000, 4096)


def test_the_soft_limit_stops_at_the_hard_limit(limits: FakeLimits) -> None:
    assert file_limit.raise_file_limit(10_000) == 4096
    assert (limits.soft, limits.hard) == (4096, 4096)


def test_a_higher_soft_limit_is_never_lowered(limits: FakeLimits) -> None:
    limits.soft = 4000
    assert file_limit.raise_file_limit(3000) == 4000
    assert limits.soft == 4000


def test_a_refused_raise_keeps_the_limit_and_goes_on(limits: FakeLimits) -> None:
    limits.refuse = True
    assert file_limit.raise_file_limit(3000) == 1024
    assert limits.soft == 1024
