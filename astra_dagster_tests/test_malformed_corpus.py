"""The malformed-file corpus (issue #13 point 6): every case fails its own source with one line
naming the source and its own problem, in one real Dagster run, and the good sources compute.

Manifest-level faults that registration refuses by design are checked one release each."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest

from astra_dagster.db.connection import connect
from astra_dagster.definitions import defs
from astra_dagster.defs.spectra import spectra
from astra_dagster.lineage import store
from astra_dagster.orchestration.planned_runs import run_planned
from astra_dagster.releases.plan import SOURCE_BLOCKS_NAME, plan_new_releases
from astra_dagster.releases.register import register_release
from astra_dagster.spectra.manifest import ManifestError
from astra_dagster_tests.malformed_corpus import CASES, REFUSED_MANIFESTS, build_corpus


@pytest.fixture
def instance(clean_db: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("ASTRA_SOURCES_PER_PARTITION", "25")
    with dg.instance_for_test() as inst:
        yield inst


def test_corpus_is_large_and_its_phrases_are_distinct() -> None:
    assert len(CASES) >= 50
    assert len({c.name for c in CASES}) == len(CASES)
    # no case may pass on the ID-mismatch check (except the one case that is about it)
    assert [c.name for c in CASES if "holds source" in c.expected] == ["objid-of-another-source"]


def _tasks(conn) -> dict[str, list[tuple[int, str | None]]]:
    rows = conn.execute(
        "select s.source_id, t.status_code, t.error from astra.task t join astra.source s on s.pk = t.source_pk "
        "where t.task_id like 'Spectra.RegisterSpectra%%' order by t.pk").fetchall()
    out: dict[str, list[tuple[int, str | None]]] = {}
    for sid, status, error in rows:
        out.setdefault(sid, []).append((status, error))
    return out


def _spectrum_counts(conn) -> tuple[int, int, dict[str, int]]:
    total, distinct = conn.execute(
        "select count(*), count(distinct (source_pk, path, row_index)) from astra.spectrum").fetchone()
    per_source = dict(conn.execute(
        "select s.source_id, count(*) from astra.spectrum sp join astra.source s on s.pk = sp.source_pk "
        "group by 1").fetchall())
    return total, distinct, per_source


def test_every_malformed_file_fails_its_own_source(instance: dg.DagsterInstance, tmp_path: Path) -> None:
    data_root = tmp_path / "data"
    corpus = build_corpus(data_root)
    plan = plan_new_releases(instance, data_root, None, block_size=25)
    assert [r.release for r in plan.registrations] == ["corpus"]
    instance.add_dynamic_partitions(SOURCE_BLOCKS_NAME, plan.new_partition_keys)

    outcome = run_planned(defs, plan.runs, [spectra.key], instance=instance)[0]
    assert outcome.success  # the batch went on: no case crashed the step
    tried = len(corpus.cases) + len(corpus.good)
    (counts,) = outcome.counts
    print(f"malformed corpus: tried {tried} / errored {counts.failed} / computed {counts.computed}")
    assert (counts.computed, counts.skipped, counts.failed) == (len(corpus.good), 0, len(corpus.cases))

    with connect() as conn:
        tasks = _tasks(conn)
        total, distinct, per_source = _spectrum_counts(conn)
    wrong = []
    for sid, case in corpus.cases.items():
        (status, error), = tasks[sid]  # exactly one task per source
        if status != store.STATUS_FAILURE or case.expected not in (error or "") or sid not in error:
            wrong.append(f"{case.name} ({sid}): status {status}, error {error!r}")
        elif "\n" in error or "Traceback" in error:
            wrong.append(f"{case.name} ({sid}): error is not one line: {error!r}")
    assert not wrong, "\n".join(wrong)
    assert all(tasks[sid] == [(store.STATUS_SUCCESS, None)] for sid in corpus.good)
    # nothing lost, nothing duplicated: each good source's 5 spectra once, no bad source's rows
    assert per_source == {sid: corpus.good_rows for sid in corpus.good}
    assert total == distinct == len(corpus.good) * corpus.good_rows

    # Again: good sources are skipped, bad ones fail again with the same errors, no row is added.
    rerun = run_planned(defs, plan.runs, [spectra.key], instance=instance)[0]
    assert rerun.success
    assert [(c.computed, c.skipped, c.failed) for c in rerun.counts] == [(0, len(corpus.good), len(corpus.cases))]
    with connect() as conn:
        assert _spectrum_counts(conn) == (total, distinct, per_source)
        again = _tasks(conn)
    for sid in corpus.cases:
        assert len(again[sid]) == 1 and again[sid][0][1] == tasks[sid][0][1]


@pytest.mark.parametrize(("payload", "message"), list(REFUSED_MANIFESTS.values()), ids=list(REFUSED_MANIFESTS))
def test_manifest_faults_refuse_the_release_in_one_line(clean_db: str, tmp_path: Path, payload: dict,
                                                        message: str) -> None:
    release = tmp_path / payload["release"]
    release.mkdir()
    (release / "manifest.json").write_text(json.dumps(payload))
    with pytest.raises(ManifestError) as caught, connect() as conn:
        register_release(conn, release)
    text = str(caught.value)
    assert message in text and str(release / "manifest.json") in text and "\n" not in text
    with connect() as conn:
        assert conn.execute("select (select count(*) from astra.data_release), (select count(*) from "
                            "astra.source), (select count(*) from astra.release_file)").fetchone() == (0, 0, 0)
