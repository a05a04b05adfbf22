"""The eight ADL queries in ROOT RDataFrame (PyPI ``root``), as a peer.

Same conventions as ``queries.py`` (float64 kinematics, first candidate wins
ties, Q7 skips events without a clean jet). C++ helpers compute each value
and its bin index with boost-histogram's regular-axis arithmetic, so the
counts (flow bins included) can be compared bit for bit with ``hist``'s;
RDataFrame fills an integer-centred TH1D of those indices.

At its best: cling compiles with ``EXTRA_CLING_ARGS=-O2`` (unless the environment says otherwise), and
a run's time (``wall_s``) is its event loop as RDataFrame times it, the just-in-time compilation of the
run's expressions apart (``jit_s``; ``total_s`` is the whole call).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from casa_benchmarks.adl.binning import BINNING, HISTOGRAMS

CPP = r"""
#include <cmath>
#include <limits>
#include "ROOT/RVec.hxx"
namespace adl {
using ROOT::RVec;
using RVecF = RVec<float>;
using RVecI = RVec<int>;

int bin(double x, int n, double lo, double hi) {
  const double z = (x - lo) / (hi - lo);
  if (z < 1) return z >= 0 ? static_cast<int>(z * n) + 1 : 0;
  return n + 1;  // overflow and NaN
}

RVecI bins(const RVecF &x, int n, double lo, double hi) {
  RVecI out(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) out[i] = bin(x[i], n, lo, hi);
  return out;
}

struct P4 { double x, y, z, e; };

inline P4 p4(float pt, float eta, float phi, float m) {
  const double p = pt, f = phi, mm = m;
  P4 v{p * std::cos(f), p * std::sin(f), p * std::sinh(static_cast<double>(eta)), 0.0};
  v.e = std::sqrt(v.x * v.x + v.y * v.y + v.z * v.z + mm * mm);
  return v;
}

inline double mass(const P4 &a, const P4 &b) {
  const double x = a.x + b.x, y = a.y + b.y, z = a.z + b.z, e = a.e + b.e;
  const double m2 = e * e - x * x - y * y - z * z;
  return m2 > 0 ? std::sqrt(m2) : 0.0;
}

inline double dphi(double a, double b) {
  double d = a - b;
  while (d > M_PI) d -= 2 * M_PI;
  while (d <= -M_PI) d += 2 * M_PI;
  return d;
}

bool has_z_pair(const RVecF &pt, const RVecF &eta, const RVecF &phi, const RVecF &m, const RVecI &q) {
  const std::size_t n = pt.size();
  for (std::size_t i = 0; i < n; ++i)
    for (std::size_t j = i + 1; j < n; ++j) {
      if (q[i] == q[j]) continue;
      const double mm = mass(p4(pt[i], eta[i], phi[i], m[i]), p4(pt[j], eta[j], phi[j], m[j]));
      if (mm > 60 && mm < 120) return true;
    }
  return false;
}

// {trijet pT, max b-tag} of the trijet closest to 172.5 GeV (n >= 3 jets)
RVec<double> trijet(const RVecF &pt, const RVecF &eta, const RVecF &phi, const RVecF &m, const RVecF &btag) {
  const std::size_t n = pt.size();
  std::vector<P4> v(n);
  for (std::size_t a = 0; a < n; ++a) v[a] = p4(pt[a], eta[a], phi[a], m[a]);
  double best = std::numeric_limits<double>::infinity();
  std::size_t bi = 0, bj = 1, bk = 2;
  for (std::size_t i = 0; i + 2 < n; ++i)
    for (std::size_t j = i + 1; j + 1 < n; ++j) {
      const double sx = v[i].x + v[j].x, sy = v[i].y + v[j].y, sz = v[i].z + v[j].z, se = v[i].e + v[j].e;
      for (std::size_t k = j + 1; k < n; ++k) {
        const double x = sx + v[k].x, y = sy + v[k].y, z = sz + v[k].z, e = se + v[k].e;
        const double m2 = e * e - x * x - y * y - z * z;
        const double d = std::abs((m2 > 0 ? std::sqrt(m2) : 0.0) - 172.5);
        if (d < best) { best = d; bi = i; bj = j; bk = k; }
      }
    }
  const double x = v[bi].x + v[bj].x + v[bk].x, y = v[bi].y + v[bj].y + v[bk].y;
  const double b = std::max(std::max(btag[bi], btag[bj]), btag[bk]);
  return {std::sqrt(x * x + y * y), b};
}

// scalar pT sum of clean jets, or NaN when there is none
double clean_sum(const RVecF &jpt, const RVecF &jeta, const RVecF &jphi,
                 const RVecF &mpt, const RVecF &meta, const RVecF &mphi,
                 const RVecF &ept, const RVecF &eeta, const RVecF &ephi) {
  std::vector<std::pair<double, double>> lep;
  for (std::size_t i = 0; i < mpt.size(); ++i) if (mpt[i] > 10) lep.emplace_back(meta[i], mphi[i]);
  for (std::size_t i = 0; i < ept.size(); ++i) if (ept[i] > 10) lep.emplace_back(eeta[i], ephi[i]);
  double total = 0;
  bool found = false;
  for (std::size_t i = 0; i < jpt.size(); ++i) {
    if (!(jpt[i] > 30)) continue;
    bool clean = true;
    for (const auto &l : lep) {
      const double de = static_cast<double>(jeta[i]) - l.first, dp = dphi(jphi[i], l.second);
      if (!(std::sqrt(de * de + dp * dp) >= 0.4)) { clean = false; break; }
    }
    if (clean) { total += jpt[i]; found = true; }
  }
  return found ? total : std::numeric_limits<double>::quiet_NaN();
}

// mT of MET and the leading lepton outside the SFOS pair closest to 91.2 GeV, or NaN
double q8_mt(const RVecF &mpt, const RVecF &meta, const RVecF &mphi, const RVecF &mm, const RVecI &mq,
             const RVecF &ept, const RVecF &eeta, const RVecF &ephi, const RVecF &em, const RVecI &eq,
             float met, float met_phi) {
  const std::size_t nm = mpt.size(), n = nm + ept.size();
  if (n < 3) return std::numeric_limits<double>::quiet_NaN();
  std::vector<P4> v(n);
  std::vector<double> pt(n), phi(n);
  std::vector<int> q(n), fl(n);
  for (std::size_t i = 0; i < n; ++i) {
    const bool mu = i < nm;
    const std::size_t k = mu ? i : i - nm;
    pt[i] = mu ? mpt[k] : ept[k];
    phi[i] = mu ? mphi[k] : ephi[k];
    q[i] = mu ? mq[k] : eq[k];
    fl[i] = mu ? 0 : 1;
    v[i] = mu ? p4(mpt[k], meta[k], mphi[k], mm[k]) : p4(ept[k], eeta[k], ephi[k], em[k]);
  }
  double best = std::numeric_limits<double>::infinity();
  long bi = -1, bj = -1;
  for (std::size_t i = 0; i < n; ++i)
    for (std::size_t j = i + 1; j < n; ++j) {
      if (fl[i] != fl[j] || q[i] == q[j]) continue;
      const double d = std::abs(mass(v[i], v[j]) - 91.2);
      if (d < best) { best = d; bi = i; bj = j; }
    }
  if (bi < 0) return std::numeric_limits<double>::quiet_NaN();
  long lead = -1;
  for (std::size_t i = 0; i < n; ++i)
    if ((long)i != bi && (long)i != bj && (lead < 0 || pt[i] > pt[lead])) lead = i;
  const double c = std::cos(phi[lead] - static_cast<double>(met_phi));
  return std::sqrt(2.0 * pt[lead] * static_cast<double>(met) * (1.0 - c));
}
}  // namespace adl
"""

# RDataFrame's own timing of each run (ROOT's RDF log channel at info level): the event loop apart from
# the just-in-time compilation of the run's expressions, which happens first in the same call
LOOP_TIMES = r"""
#include <cstdlib>
#include <memory>
#include <string>
#include "ROOT/RLogger.hxx"
#include "ROOT/RDF/Utils.hxx"
namespace adl_timing {
double loop_s = -1.0;
double jit_s = 0.0;
class Handler : public ROOT::RLogHandler {
public:
   bool Emit(const ROOT::RLogEntry &entry) override {
      const std::string &m = entry.fMessage;
      if (m.rfind("Finished event loop", 0) == 0) {  // "... (0.12s CPU, 0.13s elapsed)."
         auto p = m.find("s CPU, ");
         if (p != std::string::npos) loop_s = std::atof(m.c_str() + p + 7);
         return false;
      }
      if (m.rfind("Just-in-time compilation phase completed", 0) == 0) {  // "... in 0.25 seconds."
         auto p = m.find(" in ");
         if (p != std::string::npos) jit_s += std::atof(m.c_str() + p + 4);
         return false;
      }
      return entry.fLevel != ROOT::ELogLevel::kInfo;  // the other info messages this verbosity brings: not shown
   }
};
ROOT::RLogScopedVerbosity *verbosity = nullptr;
void install() {
   ROOT::RLogManager::Get().PushFront(std::make_unique<Handler>());
   verbosity = new ROOT::RLogScopedVerbosity(ROOT::Detail::RDF::RDFLogChannel(), ROOT::ELogLevel::kInfo);
}
}
"""

# cling compiles declared helpers and RDataFrame's expressions without optimisation unless told: a peer
# is measured at its best (set before ROOT is imported; a value already in the environment is kept)
CLING_ARGS = "-O2"

_declared = False


def root() -> Any:
    """Import ROOT (with ``EXTRA_CLING_ARGS=-O2`` unless set) and declare the helpers once."""
    global _declared
    os.environ.setdefault("EXTRA_CLING_ARGS", CLING_ARGS)
    import ROOT

    if not _declared:
        if not ROOT.gInterpreter.Declare(CPP):
            raise RuntimeError("could not declare the ADL C++ helpers")
        if not ROOT.gInterpreter.Declare(LOOP_TIMES):
            raise RuntimeError("could not declare the RDataFrame loop timer")
        ROOT.adl_timing.install()
        _declared = True
    return ROOT


def _bins(name: str, expr: str, vector: bool = False) -> str:
    n, lo, hi, _ = BINNING[name]
    fn = "adl::bins" if vector else "adl::bin"
    return f"{fn}({expr}, {n}, {lo!r}, {hi!r})"


def _book(df: Any, name: str, column: str) -> Any:
    n = BINNING[name][0]
    return df.Histo1D(("h_" + name, name, n + 2, -0.5, n + 1.5), column)


def book_query(df: Any, query: int) -> dict[str, Any]:
    """Book the histograms of one query (lazy results) on ``df``."""
    if query == 1:
        return {"q1": _book(df.Define("b", _bins("q1", "MET_pt")), "q1", "b")}
    if query == 2:
        return {"q2": _book(df.Define("b", _bins("q2", "Jet_pt", True)), "q2", "b")}
    if query == 3:
        d = df.Define("b", _bins("q3", "Jet_pt[abs(Jet_eta) < 1]", True))
        return {"q3": _book(d, "q3", "b")}
    if query == 4:
        d = df.Filter("Sum(Jet_pt > 40) >= 2").Define("b", _bins("q4", "MET_pt"))
        return {"q4": _book(d, "q4", "b")}
    if query == 5:
        d = df.Filter("adl::has_z_pair(Muon_pt, Muon_eta, Muon_phi, Muon_mass, Muon_charge)")
        return {"q5": _book(d.Define("b", _bins("q5", "MET_pt")), "q5", "b")}
    if query == 6:
        d = df.Filter("Jet_pt.size() >= 3").Define(
            "t", "adl::trijet(Jet_pt, Jet_eta, Jet_phi, Jet_mass, Jet_btag)"
        )
        d = d.Define("bp", _bins("q6_pt", "t[0]")).Define("bb", _bins("q6_btag", "t[1]"))
        return {"q6_pt": _book(d, "q6_pt", "bp"), "q6_btag": _book(d, "q6_btag", "bb")}
    if query == 7:
        d = df.Define(
            "s",
            "adl::clean_sum(Jet_pt, Jet_eta, Jet_phi, Muon_pt, Muon_eta, Muon_phi,"
            " Electron_pt, Electron_eta, Electron_phi)",
        ).Filter("!std::isnan(s)")
        return {"q7": _book(d.Define("b", _bins("q7", "s")), "q7", "b")}
    if query == 8:
        d = df.Define(
            "mt",
            "adl::q8_mt(Muon_pt, Muon_eta, Muon_phi, Muon_mass, Muon_charge,"
            " Electron_pt, Electron_eta, Electron_phi, Electron_mass, Electron_charge,"
            " MET_pt, MET_phi)",
        ).Filter("!std::isnan(mt)")
        return {"q8": _book(d.Define("b", _bins("q8", "mt")), "q8", "b")}
    raise ValueError(f"no ADL query {query}")


def dataframe(files: list[str], tree: str = "Events") -> tuple[Any, Any]:
    """(RDataFrame, TChain keeping it alive). Through a TChain: ROOT 6.40's
    RDataFrame(tree, names) opens ``root://host//path`` as the local ``/path``."""
    ROOT = root()
    chain = ROOT.TChain(tree)
    for f in files:
        chain.Add(f)
    return ROOT.RDataFrame(chain), chain


def counts_of(h: Any) -> np.ndarray:
    """Counts with flow bins (index 0 underflow, n + 1 overflow) of a booked TH1D."""
    return np.array([h.GetBinContent(i) for i in range(1, h.GetNbinsX() + 1)], dtype=np.int64)


@dataclass
class RdfResult:
    query: int
    threads: int
    events: int
    wall_s: float  # the event loop: RDataFrame's own timing, its just-in-time compilation apart
    cpu_s: float
    bytes_read: int
    counts: dict[str, np.ndarray] = field(default_factory=dict)
    total_s: float = 0.0  # the whole call: building the graph, compiling its expressions, the loop
    jit_s: float = 0.0  # the compilation of the run's expressions, as RDataFrame logs it


def _threads(ROOT: Any, n: int) -> None:
    if ROOT.IsImplicitMTEnabled():
        ROOT.DisableImplicitMT()
    if n:
        ROOT.EnableImplicitMT(n)


def run_query(files: list[str], query: int, threads: int = 0, tree: str = "Events") -> RdfResult:
    """One query over ``files``; ``threads`` 0 = single-threaded, n = implicit MT with n."""
    ROOT = root()
    _threads(ROOT, threads)
    ROOT.adl_timing.loop_s, ROOT.adl_timing.jit_s = -1.0, 0.0
    t0, c0, b0 = time.perf_counter(), time.process_time(), ROOT.TFile.GetFileBytesRead()
    df, _chain = dataframe(files, tree)
    count = df.Count()
    booked = book_query(df, query)
    events = int(count.GetValue())  # runs the event loop once for everything booked
    counts = {name: counts_of(h.GetValue()) for name, h in booked.items()}
    total, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert set(counts) == set(HISTOGRAMS[query])
    loop = float(ROOT.adl_timing.loop_s)
    if loop < 0:
        raise RuntimeError("RDataFrame logged no event loop time (ROOT's RDF log messages changed?)")
    return RdfResult(query, threads, events, loop, cpu, int(ROOT.TFile.GetFileBytesRead() - b0), counts,
                     total_s=total, jit_s=float(ROOT.adl_timing.jit_s))


def warm_up(file: str, queries: list[int], tree: str = "Events") -> None:
    """JIT-compile the helpers on a few events, outside any timed region."""
    ROOT = root()
    _threads(ROOT, 0)
    df, _chain = dataframe([file], tree)
    df = df.Range(100)
    booked = [h for q in queries for h in book_query(df, q).values()]
    for h in booked:
        h.GetValue()


def main(argv: list[str] | None = None) -> int:
    """``python -m casa_benchmarks.adl.rdf --threads 0,2 --queries 1,2 FILE...``: JSON rows on stdout."""
    ap = argparse.ArgumentParser(prog="python -m casa_benchmarks.adl.rdf")
    ap.add_argument("--threads", default="0", help="comma-separated; 0 = single-threaded")
    ap.add_argument("--queries", default="1,2,3,4,5,6,7,8")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--serve", action="store_true",
                    help="read 'QUERY THREADS' lines on stdin, answer a JSON row per line (timed in turn with others)")
    ap.add_argument("files", nargs="+")
    args = ap.parse_args(argv)
    queries = [int(q) for q in args.queries.split(",")]
    warm_up(args.files[0], queries)
    if args.serve:
        print(json.dumps({"ready": True}), flush=True)
        for line in sys.stdin:
            q, threads = map(int, line.split())
            r = run_query(args.files, q, threads)
            print(json.dumps({"query": q, "threads": threads, "events": r.events, "wall_s": r.wall_s,
                              "total_s": r.total_s, "jit_s": r.jit_s,
                              "cling_args": os.environ.get("EXTRA_CLING_ARGS", ""),
                              "counts": {k: v.tolist() for k, v in r.counts.items()}}), flush=True)
        return 0
    rows = []
    for threads in (int(t) for t in args.threads.split(",")):
        for q in queries:
            best = min((run_query(args.files, q, threads) for _ in range(args.repeat)), key=lambda r: r.wall_s)
            rows.append({"query": q, "threads": threads, "events": best.events, "wall_s": best.wall_s,
                         "total_s": best.total_s, "jit_s": best.jit_s,
                         "cling_args": os.environ.get("EXTRA_CLING_ARGS", ""), "cpu_s": best.cpu_s,
                         "bytes_read": best.bytes_read,
                         "counts": {k: v.tolist() for k, v in best.counts.items()}})
    json.dump(rows, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
