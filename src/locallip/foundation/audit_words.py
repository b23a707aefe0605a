"""The attack audit's record in words, shared by the certify stage's console line and the report
(torch-free, so the report can use it)."""
from __future__ import annotations


def audit_share(a: dict) -> str:
    """"audited N of M certified points (budget b x certification time)" where the audit's budget left
    robust points unattacked; "" otherwise (and for certificates written before the budget)."""
    if a.get("budget") is None or not a.get("unaudited"):
        return ""
    return (f"audited {a['checked']} of {a['robust_points']} certified points "
            f"(budget {a['budget']:g} x certification time)")
