"""Ahead-of-time compilation for real GPUs (fastdiff_kernels.aot), checked on a machine without one.

CI compiles the default config of every kernel for sm_80/86/89/90 at a few representative shapes with
Triton's compiler and bundled ptxas (worker processes, interpreter off) and asserts that each compiles,
fits the arch's shared memory and does not spill. A mutation check feeds the checker configs known to be
too big for sm_86's shared memory or to spill, and the committed sweep tables are checked against the
pruned candidate lists and defaults. The full sweep is the slow test.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from fastdiff_kernels import adaln_modulate as am
from fastdiff_kernels import aot, autotune
from fastdiff_kernels import noise_schedule as ns
from fastdiff_kernels import temporal_attention as ta

PROFILES = Path(__file__).resolve().parent.parent / "profiles" / "aot"
WHY_NOT = aot.compiler_missing()
needs_compiler = pytest.mark.skipif(WHY_NOT is not None, reason=f"cannot compile for GPUs here: {WHY_NOT}")
JOBS = min(2, os.cpu_count() or 1)


def attention_spec(kind, t_pad, d, dtype, cfg, arch, roles=("candidate",)):
    return aot.Spec(f"temporal_attention.{kind}", ta.OP_NAME, ta.config_key(kind, t_pad, d, getattr(torch, dtype)),
                    {"N": 8192, "T": aot.ATTENTION_FRAMES[t_pad], "H": 8, "D": d}, cfg, dtype, arch, roles)


# Known bad, from the sweeps: a backward tile needing 114,688 B of shared memory (sm_86 has 101,376), and a
# forward tile of 16 sequences on 2 warps that spills (about 480 B with Triton 3.9, more with 3.6).
OVERSIZED = attention_spec("bwd", 64, 128, "bfloat16", {"BLOCK_SEQ": 2, "num_warps": 4, "num_stages": 1}, 86)
SPILLING = attention_spec("fwd", 16, 64, "bfloat16", {"BLOCK_SEQ": 16, "num_warps": 2, "num_stages": 1}, 86)
# num_stages is not a tuning axis: the attention kernels have no pipelined loop, so it must not change the binary.
STAGES = [attention_spec("bwd", 32, 64, "bfloat16", {"BLOCK_SEQ": 2, "num_warps": 4, "num_stages": ns}, 90)
          for ns in (1, 2)]


def documented_spill(record) -> int:
    """Spill bytes the AOT table accepts for this default (a shape that cannot avoid spilling), else 0."""
    if not record["op"]:
        return 0
    import triton

    from fastdiff_kernels.aot_table import TABLE

    entry = TABLE.get(aot.minor(triton.__version__), {}).get(record["arch"], {}).get(record["op"], {})
    return entry.get(record["key"], {}).get("unavoidable_spill_bytes", 0)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Records of the CI subset (defaults at small shapes, all four archs) plus the mutation specs."""
    if WHY_NOT is not None:
        pytest.skip(f"cannot compile for GPUs here: {WHY_NOT}")
    specs = aot.all_specs("defaults", small=True) + [OVERSIZED, SPILLING, *STAGES]
    # A fresh cache: every spec is compiled by this run, none is taken from an earlier one.
    records = aot.run_specs(specs, jobs=JOBS, timeout=300, cache_dir=tmp_path_factory.mktemp("aot-cache"))
    extra = len(specs) - 4
    return records[:extra], records[extra:]


@needs_compiler
def test_every_kernels_default_compiles_fits_and_does_not_spill_on_every_arch(compiled):
    defaults, _ = compiled
    kernels = {r["kernel"] for r in defaults}
    assert kernels == set(aot.FAMILIES), f"kernels without a default spec: {set(aot.FAMILIES) - kernels}"
    assert {r["arch"] for r in defaults} == set(aot.SHARED_LIMIT)
    problems = []
    for r in defaults:
        where = f"{r['kernel']} {r['key'] or r['shape']} {r['dtype']} {r['config']} sm_{r['arch']}"
        if r["status"] != "ok":
            problems.append(f"{where}: {r['status']}: {r.get('error')}")
        elif not r["fits"]:
            problems.append(f"{where}: {r['shared']:,} B shared > {r['shared_limit']:,} B")
        elif r["spill_bytes"] > documented_spill(r):
            problems.append(f"{where}: spills {r['spill_bytes']} B at {r['registers']} registers")
    assert not problems, "\n".join(problems)


@needs_compiler
def test_checker_flags_an_oversized_tile_and_a_spilling_one(compiled):
    """Mutation check: the verdicts must fail where they should, and the table must act on them."""
    _, (oversized, spilling, *_) = compiled
    assert oversized["status"] == "ok" and oversized["shared"] > aot.SHARED_LIMIT[86]
    assert not oversized["fits"] and not aot.usable(oversized)
    assert spilling["status"] == "ok" and spilling["fits"] and spilling["spills"] and spilling["spill_bytes"] > 0
    # table_entries on these records: the oversized candidate is rejected; a spilling heuristic default is
    # replaced by a clean candidate of its key.
    clean = {**spilling, "config": {**spilling["config"], "BLOCK_SEQ": 8}, "spills": False, "spill_bytes": 0,
             "roles": ["candidate"]}
    entries = aot.table_entries([{**oversized, "roles": ["candidate"]}, {**spilling, "roles": ["heuristic"]}, clean])
    assert entries[86][ta.OP_NAME][OVERSIZED.key]["rejected"] == ["BLOCK_SEQ=2,num_stages=1,num_warps=4"]
    assert entries[86][ta.OP_NAME][SPILLING.key]["default"] == clean["config"]
    assert "spills" in entries[86][ta.OP_NAME][SPILLING.key]["reason"]


@needs_compiler
def test_num_stages_does_not_change_the_attention_binary(compiled):
    _, (_, _, one, two) = compiled
    assert one["status"] == two["status"] == "ok"
    assert one["compile_key"] != two["compile_key"]  # really two compiles
    assert one["cubin_sha"] == two["cubin_sha"]


def test_parse_ptxas_report():
    log = ("ptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
           "ptxas info    : Function properties for k\n"
           "    256 bytes stack frame, 252 bytes spill stores, 260 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers\n")
    assert aot.parse_ptxas(log) == {"registers": 255, "stack_frame": 256, "spill_stores": 252, "spill_loads": 260}
    record = aot.judge({"status": "ok", "shared": 1000, "shared_limit": 999, **aot.parse_ptxas(log)})
    assert not record["fits"] and record["spills"] and record["spill_bytes"] == 260


# --------------------------------------------------------------------------------------------------
# The committed sweeps (profiles/aot/<triton version>.json) against the pruned lists and the defaults
# --------------------------------------------------------------------------------------------------


def full_sweeps():
    paths = sorted(p for p in PROFILES.glob("*.json") if not p.stem.endswith("-defaults"))
    return [json.loads(p.read_text()) for p in paths]


def candidates_for(record, version):
    if record["op"] == ta.OP_NAME:
        kind, t_pad, d = record["key"].split("|")[0], int(record["key"].split("T_PAD=")[1].split("|")[0]), \
            record["shape"]["D"]
        configs = [{**c, "num_stages": 1} for c in autotune.grid(BLOCK_SEQ=[1, 2, 4, 8, 16], num_warps=[2, 4, 8])
                   if c["BLOCK_SEQ"] * t_pad <= ta.MAX_TILE_ROWS[kind]]
        assert configs == ta.tune_candidates(kind, t_pad, d, getattr(torch, record["dtype"]))  # arch None: all
        fields = ta.CONFIG_FIELDS
    elif record["op"] == am.OP_NAME:
        kind = record["key"].split("|")[0]
        configs = am.tune_candidates(kind, am.block_d_for(record["shape"]["D"]), getattr(torch, record["dtype"]))
        fields = am.config_fields(kind)
    else:
        configs = ns.warp_candidates(ns.block_for(record["shape"]["CHW"]))
        fields = ns.CONFIG_FIELDS
    return autotune.aot_allowed(record["op"], record["key"], configs, record["arch"], fields, version), fields


def test_committed_sweeps_exist_for_both_triton_versions():
    versions = {aot.minor(d["triton"]) for d in full_sweeps()}
    assert {"3.6", "3.9"} <= versions, f"profiles/aot has full sweeps for {sorted(versions)}"
    for data in full_sweeps():
        assert (PROFILES / f"{data['triton']}.md").exists()


def test_a_defaults_report_without_a_table_for_its_version_says_so():
    """A --subset defaults report of a Triton version the table has no full sweep of (3.8 here) says that none of
    its defaults was chosen for it and counts those that spill, instead of claiming every shape avoids spilling;
    with its version's entries the report lists them as before."""
    data = json.loads((PROFILES / "3.8.0-defaults.json").read_text())
    spilling = sum(bool(r.get("spills")) for r in data["records"] if r["status"] == "ok")
    assert spilling > 0  # the claim the old report made would be false here
    report = aot.markdown_report(data, {})
    assert "No table for this Triton version" in report and f"{spilling} of {len(data['records'])}" in report
    assert "every shape has a default" not in report
    assert (PROFILES / "3.8.0-defaults.md").read_text() == report
    from fastdiff_kernels.aot_table import TABLE

    nine = json.loads((PROFILES / "3.9.0-defaults.json").read_text())
    assert "No table" not in aot.markdown_report(nine, TABLE["3.9"])
    assert "## Defaults changed for this Triton version" in aot.markdown_report(nine, TABLE["3.9"])


def test_pruned_candidates_hold_no_config_that_failed_timed_out_or_does_not_fit():
    """Every candidate recorded as a compile error, a timeout (fp32 attention tiles that take minutes) or
    over the arch's shared memory is gone from that arch's tuning list for that Triton version."""
    from fastdiff_kernels.autotune import config_id

    checked = 0
    for data in full_sweeps():
        version = aot.minor(data["triton"])
        for r in data["records"]:
            if not r["op"] or "candidate" not in r["roles"] or r["status"] == "not_run" or aot.usable(r):
                continue
            allowed, fields = candidates_for(r, version)
            assert config_id(r["config"], fields) not in {config_id(c, fields) for c in allowed}, (version, r["key"])
            checked += 1
    assert checked > 0, "no bad candidate in the sweeps: nothing was pruned (or the check is broken)"


def test_table_defaults_are_clean_in_the_sweep_and_used_by_the_launchers():
    """Each replacement default compiled, fits and does not spill in its sweep (or the table says the
    shape cannot avoid spilling), and arch_default hands it to launchers on that arch; the interpreter
    (no arch) keeps the heuristic."""
    from fastdiff_kernels.aot_table import TABLE
    from fastdiff_kernels.autotune import config_id

    replaced = 0
    for data in full_sweeps():
        version = aot.minor(data["triton"])
        by_id = {}
        for r in data["records"]:
            if r["op"]:
                by_id[(r["arch"], r["key"], config_id(r["config"], aot.config_fields(r["op"], r["key"])))] = r
        for arch, ops in TABLE.get(version, {}).items():
            for op, keys in ops.items():
                for key, entry in keys.items():
                    if "default" not in entry:
                        continue
                    r = by_id[(arch, key, config_id(entry["default"], aot.config_fields(op, key)))]
                    assert aot.usable(r), (version, arch, key)
                    assert r["spill_bytes"] <= entry.get("unavoidable_spill_bytes", 0), (version, arch, key)
                    assert autotune.aot_default(op, key, arch, version) == entry["default"]
                    replaced += 1
    assert replaced > 0
    assert ta.arch_default("bwd", 64, 128, torch.float32, None) == ta.default_config("bwd", 64, 128, torch.float32)


@pytest.mark.slow
@needs_compiler
def test_full_sweep(tmp_path):
    """Every (kernel, config, dtype, arch) spec of the sweep; what launchers can pick must be usable."""
    data = aot.sweep("all", jobs=JOBS, timeout=aot.DEFAULT_TIMEOUT, cache_dir=tmp_path / "cache")
    entries = aot.table_entries(data["records"])
    bad = [r for r in aot.pickable(data["records"], entries) if not aot.usable(r)]
    assert not bad, [(r["kernel"], r["key"], r["config"], r["arch"], r["status"]) for r in bad[:20]]
