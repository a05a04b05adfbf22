"""Histogram binning shared by every implementation of the ADL queries.

Pure data: 100 regular bins per histogram. Ranges follow the published ADL
benchmark (MET 0-200 GeV, jet pT 15-60 GeV, b-tag 0-1, jet pT sum 15-200 GeV,
mT 0-200 GeV), which is also what the full-file figures of adl-facts.md were
computed in, except for the Q6 trijet pT: 0-300 GeV instead of the original
15-40 GeV, which puts most trijets in the overflow.
Flow bins are kept and compared everywhere; JSON output drops them.
"""

from __future__ import annotations

NBINS = 100

# name -> (bins, low, high, axis label)
BINNING: dict[str, tuple[int, float, float, str]] = {
    "q1": (NBINS, 0.0, 200.0, "MET [GeV]"),
    "q2": (NBINS, 15.0, 60.0, "Jet $p_T$ [GeV]"),
    "q3": (NBINS, 15.0, 60.0, "Jet $p_T$, $|\\eta|<1$ [GeV]"),
    "q4": (NBINS, 0.0, 200.0, "MET, $\\geq$2 jets $p_T>40$ [GeV]"),
    "q5": (NBINS, 0.0, 200.0, "MET, OS $\\mu\\mu$ 60-120 GeV [GeV]"),
    "q6_pt": (NBINS, 0.0, 300.0, "Trijet $p_T$ [GeV]"),
    "q6_btag": (NBINS, 0.0, 1.0, "Trijet max b-tag"),
    "q7": (NBINS, 15.0, 200.0, "$\\Sigma p_T$ clean jets [GeV]"),
    "q8": (NBINS, 0.0, 200.0, "$m_T$(MET, extra lepton) [GeV]"),
}

HISTOGRAMS: dict[int, tuple[str, ...]] = {
    1: ("q1",),
    2: ("q2",),
    3: ("q3",),
    4: ("q4",),
    5: ("q5",),
    6: ("q6_pt", "q6_btag"),
    7: ("q7",),
    8: ("q8",),
}
