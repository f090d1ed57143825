"""Link shaping with ``tc``: what one interface's egress gets (netem for delay, tbf for rate)."""

from __future__ import annotations

__all__ = ["shaping_commands"]


def shaping_commands(
    ns: str, dev: str, *, bandwidth_bit_s: float | None, delay_s: float, queue_s: float
) -> list[list[str]]:
    """The ``tc`` commands that shape the egress of ``dev`` in namespace ``ns``.

    * ``netem delay`` of ``delay_s / 2`` (each link is shaped at both of its ends, so the one-way
      delay between two nodes is ``delay_s``); none if ``delay_s`` is 0.
    * ``tbf`` at ``bandwidth_bit_s`` below it, with a bucket of 1 ms at line rate but at least one
      64 KiB GSO packet (smaller buckets under-deliver at 10 Gbit/s, larger ones let bursts
      through at low rates), and a queue of ``queue_s`` at line rate; none if unlimited.
    """
    cmds = []
    parent = "root"
    if delay_s > 0:
        half_us = max(1, round(delay_s / 2 * 1e6))
        cmds.append(
            f"tc -n {ns} qdisc add dev {dev} root handle 1: netem delay {half_us}us limit 100000"
            .split()
        )
        parent = "parent 1:1"
    if bandwidth_bit_s is not None:
        rate = int(bandwidth_bit_s)
        burst = max(65536, rate // 8 // 1000)
        latency_us = max(1000, round(queue_s * 1e6))
        tbf = f"tbf rate {rate}bit burst {burst} latency {latency_us}us"
        cmds.append(f"tc -n {ns} qdisc add dev {dev} {parent} handle 10: {tbf}".split())
    return cmds
