"""Integrations with evaluation frameworks. Nothing here is imported by the core package.

* :mod:`vtprune.integrations.lmms_eval` -- lmms-eval model classes (``--model vtprune`` and wrappers of
  lmms-eval's own HF model classes) that prune with any vtprune method; needs ``lmms-eval`` installed
  (``scripts/setup_lmms_eval.sh``).
* :mod:`vtprune.integrations.manifest` -- the ``lmms_eval.models`` entry-point payload that registers them.
"""
