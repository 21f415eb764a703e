import os

import pytest

from sharegpt4v.environment import patched_environ


def test_patched_environ_sets_removes_and_puts_back_even_on_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHAREGPT4V_TEST_KEPT", "before")
    monkeypatch.setenv("SHAREGPT4V_TEST_REMOVED", "before")
    monkeypatch.delenv("SHAREGPT4V_TEST_NEW", raising=False)
    with pytest.raises(RuntimeError):
        with patched_environ({"SHAREGPT4V_TEST_KEPT": "inside", "SHAREGPT4V_TEST_REMOVED": None,
                              "SHAREGPT4V_TEST_NEW": "inside"}):
            assert os.environ["SHAREGPT4V_TEST_KEPT"] == "inside" == os.environ["SHAREGPT4V_TEST_NEW"]
            assert "SHAREGPT4V_TEST_REMOVED" not in os.environ
            raise RuntimeError("the block failed")
    assert os.environ["SHAREGPT4V_TEST_KEPT"] == "before" == os.environ["SHAREGPT4V_TEST_REMOVED"]
    assert "SHAREGPT4V_TEST_NEW" not in os.environ
