"""Pieces of the synthetic S2S load generator (`python -m bench.load`).

`wire` holds the pre-built byte templates and the XEP-0185 key, `tracker` the
loss/duplication/misrouting/latency accounting, `initiator` the outbound S2S
streams of the simulated remote servers, `listener` their authoritative and
receiving side, `procstat` the /proc sampling, `runner` one load point end to
end, `targets` the servers under test (relay, Prosody, ejabberd) and `echo`
the XEP-0114 echo/sink component every target serves its domain through.
"""
