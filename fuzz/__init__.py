"""Fuzzing the balloon device as a hostile guest would (`balloon-lab fuzz`).

A structure-aware mutation loop, in-process for speed, over the real device code,
a real memfd and real eventfds (device/rig.py's DeviceRig). The pieces, one job each:

  cases.py               the ring/device case format: constants, guest layouts, Outcome
  generators.py          well-formed cases with hostile values mixed in
  mutators.py            what a hostile guest changes in them
  reference_decoders.py  the formats and a lenient ring walk, written from the docs
  oracle.py              what an exec may discard, balloon or hint, and the check
  device_target.py       targets device and ring
  decoder_target.py      targets pfn, bitmap, chunks (wire.py against the references)
  formats_target.py      target report (free page reporting queue)
  control_cases.py       control-plane message sequences (generation, mutation)
  control_guest.py       the hostile guest's end of a control session
  wakeups.py             the VMM's own event loop around a fuzzed device; every wake-up against the 50 ms bound
  regions.py             the oracle's own region table, from docs/PROTOCOL.md (not the device's)
  control_target.py      target control (sessions on the control socket)
  migration_target.py    target migration (a guest turning hostile mid-migration)
  targets.py             each target's generator, mutator and runner; one worker's state
  time_limit.py          the per-exec time limit (hangs)
  corpus.py              case files (JSON), choosing the corpus to keep
  engine.py              the loop, the process pool, replay
  provenance.py          which code a run executed (a digest of its sources), stamped on its cases

tests/fuzz_corpus/ keeps found and representative cases; tests replay them
(engine.replay). lab/cli/commands/fuzz.py is the CLI. This package imports device/ and
never lab/.
"""
