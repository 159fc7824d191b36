"""Machine-readable reports: ``hecompile inspect --json`` and ``hecompile run --json``.

One JSON object each, with stable field names, so benchmarks and users' scripts read numbers
instead of parsing text.  ``inspect_json`` gives what the compiler predicted (from the program
and the report stored in its ``.hec``); ``run_json`` what a run measured.
"""

from __future__ import annotations

from typing import Any, Mapping

from .heprog import HEProgram
from .security import source as security_source


def _ops(prog: HEProgram, bootstraps: bool) -> dict[str, int]:
    c = prog.op_counts()
    return {"rotations": c.get("rotate", 0), "ct_pt_mults": c.get("mul_plain", 0), "ct_ct_mults": c.get("mul", 0),
            "rescales": c.get("rescale", 0), "adds": c.get("add", 0) + c.get("sub", 0) + c.get("add_plain", 0),
            "mod_switches": c.get("mod_switch", 0), "refreshes": 0 if bootstraps else c.get("refresh", 0),
            "bootstraps": c.get("refresh", 0) if bootstraps else 0, "instructions": len(prog.instrs)}


def inspect_json(prog: HEProgram, metadata: Mapping[str, Any]) -> dict[str, Any]:
    """What ``hecompile inspect --json`` prints."""
    r = dict(metadata.get("report") or {})
    p = prog.params
    refresh = (r.get("refresh_model") or {}).get("kind", "client")
    boots = refresh == "bootstrap"
    rp = r.get("params") or {}
    out: dict[str, Any] = {
        "params": {"ring_degree": p.poly_degree, "slots": p.slots, "primes": [int(q) for q in prog.primes],
                   "coeff_bits": list(p.coeff_bits), "scale_bits": p.scale_bits, "top_level": p.top_level,
                   "security": p.security,
                   "security_source": rp.get("security_note") or (security_source(p.poly_degree)
                                                                  if p.security == "tc128" else "not secure")},
        "target": r.get("target", "seal"),
        "layout": r.get("layout", "multiplexed"),
        "refresh": refresh,
        "ops": _ops(prog, boots),
        "galois_keys": len(prog.galois_steps),
        "galois_key_bytes": r.get("galois_key_bytes"),
        "key_bytes": r.get("key_bytes"),
        "key_upload_bytes": r.get("key_upload_bytes"),
        "predicted_seconds": r.get("predicted_seconds"),
        "batch": r.get("batch", 1),
        "predicted_seconds_per_input": r.get("predicted_seconds_per_input", r.get("predicted_seconds")),
        "predicted_encode_seconds": r.get("predicted_encode_seconds"),
        # an inference after the first on a server keeping what its budget leaves room for
        "predicted_served_seconds": r.get("predicted_served_seconds"),
        "predicted_network_seconds": r.get("predicted_network_seconds"),
        "predicted_keygen_seconds": r.get("predicted_keygen_seconds"),
        "predicted_peak_bytes": r.get("predicted_memory_bytes"),
        # SEAL's helper processes (hecompiler.parallel): how many evaluate, their share, their memory
        "processes": r.get("processes", 1),
        "predicted_shared_seconds": r.get("predicted_shared_seconds", 0.0),
        "predicted_helper_bytes": r.get("predicted_helper_bytes", 0),
        "predicted_cpu_seconds": r.get("predicted_cpu_seconds"),
        "cost_per_1000_inferences": r.get("cost_per_1000_inferences"),
        "client_round_trips": 0 if boots else r.get("client_round_trips", 0),
        "levels_used": prog.levels_used(),
        "cost_table": r.get("cost_table"),
        "exact": metadata.get("exact"),
        "passes": list(metadata.get("passes") or []),
        "fidelity": r.get("fidelity"),
        "layers": list(r.get("layers") or []),
        "rotation_keys": r.get("rotation_keys"),
        "plaintexts": r.get("plaintexts"),
    }
    return out


def run_json(backend: str, stats, outputs: Mapping[str, Any], reference_error: Mapping[str, Any] | None,
             predicted: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What ``hecompile run --json`` prints: measured phase seconds, peak RSS, op counts, and the
    error against the reference when one was given."""
    ph = dict(getattr(stats, "phases", {}) or {})
    out: dict[str, Any] = {
        "backend": backend,
        "seconds": {k: ph.get(k) for k in ("keygen", "encrypt", "eval", "decrypt", "total")},
        "peak_rss_bytes": stats.peak_rss_bytes,
        # helper processes (hecompiler.parallel): the largest one's peak, and the linear ops they shared
        "helper_peak_rss_bytes": getattr(stats, "helper_peak_rss_bytes", 0),
        "split_linears": getattr(stats, "split_linears", 0),
        "ops": dict(stats.op_counts),
        "refreshes": stats.refreshes,
        "refresh_round_trips": stats.refresh_round_trips,
        "bootstraps": stats.bootstraps,
        "encode_seconds": stats.encode_seconds,
        "plaintexts": stats.plaintexts,
        "plaintexts_reused": getattr(stats, "plaintexts_reused", 0),
        "peak_live_ciphertexts": stats.peak_live_ciphertexts,
        "galois_keys": stats.galois_keys,
        "seconds_by_op": dict(stats.seconds_by_op),
        "outputs": {k: {"shape": list(v.shape), "values": [float(x) for x in v.ravel()]}
                    for k, v in outputs.items()},
    }
    if backend == "sim":
        out["seconds"]["eval"] = stats.eval_seconds
        out["predicted_seconds"] = stats.predicted_seconds
    if reference_error:
        out.update(reference_error)
    if predicted:
        out["predicted"] = dict(predicted)
    return out


def _mib(b: float) -> str:
    return f"{b / 2**20:.1f} MiB" if b < 2**30 else f"{b / 2**30:.2f} GiB"


def key_trade_lines(r: Mapping[str, Any]) -> list[str]:
    """The compile report's lines on the rotation-key trade (pass select-rotation-keys) and on
    plaintexts (encoded per inference, kept across inferences)."""
    lines = []
    rk = r.get("rotation_keys")
    if rk:
        extra = rk["rotations"] - rk["rotations_direct"]
        budget = (f"; the memory budget allows {rk['budget_keys']}" if rk.get("budget_keys") is not None else "")
        lines.append(f"rotation keys: {rk['keys']} Galois keys ({_mib(rk['key_bytes'])}) instead of one per step used "
                     f"({rk['keys_before']}, {_mib(rk['key_bytes_before'])}), {extra:+d} rotations "
                     f"(every rotation composed from them){budget}")
        curve = rk.get("curve") or []
        if len(curve) > 1:
            per = rk["key_bytes"] / max(1, rk["keys"])
            pick = sorted({curve[0], curve[len(curve) // 4], curve[len(curve) // 2], curve[3 * len(curve) // 4],
                           curve[-1]})
            lines.append("  trade (keys: memory, rotations): " + "; ".join(
                f"{k}: {_mib(k * per)}, {rot}" for k, rot in pick))
    pt = r.get("plaintexts")
    if pt and pt.get("encoded"):
        head = pt.get("cache_headroom_bytes")
        lines.append(f"plaintexts: {pt['encoded']} encoded per inference, each at the level it is used "
                     f"({pt['encode_seconds']:.2f} s predicted, {_mib(pt['bytes_all'])} if all are kept); an eval keeps "
                     f"up to HECOMPILER_PLAINTEXT_CACHE (default 256 MiB, counted in the predicted peak), and "
                     f"'hecompile serve' keeps them across inferences in what the memory budget leaves"
                     + (f" ({_mib(head)} more)" if head is not None else ""))
    return lines
