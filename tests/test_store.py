import pytest

from speedrun.store import RunStore, StoreError


def _start(store, run_id, recipe="r", group=None):
    store.start_run(run_id=run_id, recipe_name=recipe, recipe={"name": recipe}, env={"device_name": "cpu"},
                    target=0.9, seed=0, group_id=group)


def test_runs_are_recorded_at_start_and_updated_at_the_end(tmp_path):
    store = RunStore(tmp_path / "runs.sqlite")
    _start(store, "abc123")
    assert store.get_run("abc")["outcome"] == "running"
    store.finish_run("abc123", outcome="reached", detail="ok", summary={"time_to_accuracy_s": 3.5,
                     "best_accuracy": 0.91}, curve=[{"elapsed_s": 1.0, "accuracy": 0.91}])
    run = RunStore(tmp_path / "runs.sqlite").get_run("abc123")  # persisted
    assert run["outcome"] == "reached" and run["time_to_accuracy_s"] == 3.5
    assert run["curve"] == [{"elapsed_s": 1.0, "accuracy": 0.91}] and run["recipe"] == {"name": "r"}


def test_list_filters_and_prefixes(tmp_path):
    store = RunStore(tmp_path / "runs.sqlite")
    _start(store, "aa1", recipe="x", group="g")
    _start(store, "aa2", recipe="y", group="g")
    _start(store, "bb1", recipe="x")
    store.finish_run("bb1", outcome="diverged", detail="nan", summary={}, curve=[])
    assert {r["id"] for r in store.list_runs(recipe="x")} == {"aa1", "bb1"}
    assert [r["id"] for r in store.list_runs(outcome="diverged")] == ["bb1"]
    assert {r["id"] for r in store.list_runs(group="g")} == {"aa1", "aa2"}
    assert len(store.list_runs(limit=1)) == 1
    with pytest.raises(StoreError, match="ambiguous"):
        store.get_run("aa")
    with pytest.raises(StoreError, match="no run with id 'zz'"):
        store.get_run("zz")


def test_unwritable_store_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StoreError, match="cannot open the run store"):
        RunStore(blocker / "runs.sqlite")
