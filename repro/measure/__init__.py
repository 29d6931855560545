"""What measures: `flops` (fvcore and FlopCounterMode, nothing skipped silently), `memory` (allocator peaks and
fake-mode estimates), `environment` (library versions), `steps` (the one training-step helper and the
method strings every CSV uses), `variants` (the context modules the claims compare), and the three commands
built on them: `claims`, `profile`, `bench`."""
