"""Pieces of the synthetic S2S load generator (`python -m bench.load`).

`wire` holds the pre-built byte templates and the XEP-0185 key, `tracker` the
fate of every stanza sent (echoed, bounced, lost, ...) and the latency,
`streams` the simulated remote servers' outbound S2S streams and the
connections the target opens to them, `sm` their XEP-0198 counters and ack
checks, `progress` the live status line, `procstat` the /proc sampling,
`profile` py-spy on the target and its summaries, `runner` one load point end
to end, `targets` the servers under test (relay, Prosody, ejabberd), `plot`
the sweep plot and `echo` the XEP-0114 echo/sink component every target
serves its domain through, and the bounces it reports.
"""
