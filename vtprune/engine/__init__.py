"""The engine: what happens between a model's forward and the kept tokens, as rooms a newcomer can name.

* :mod:`~vtprune.engine.state`: the per-forward state as explicit types (maps, layout, forward, call, cache).
* :mod:`~vtprune.engine.selection`: the selection core. Runs one step (method + budget) on a sequence's spans
  and returns what stays; knows nothing of hooks or of transformers. Every host calls it.
* :mod:`~vtprune.engine.layout`: feature calls -> which image, frame, grid cell and ViT row each placeholder holds.
* :mod:`~vtprune.engine.capture`: the hooks recording what signals are computed from, driven by the signal
  table (:data:`vtprune.signals.SIGNAL_TABLE`).
* :mod:`~vtprune.engine.view`: the signal source over a :class:`~vtprune.engine.state.Forward` (computes a
  signal when a method asks).
* :mod:`~vtprune.engine.steps`: a step on a Forward (candidates, view, core) and the pre-LLM loop; both hosts.
* :mod:`~vtprune.engine.surgery` and :mod:`~vtprune.engine.sequence`: cutting sequences, masks, positions and
  caches in prefill, decode and at decoder layer K.
* :mod:`~vtprune.engine.loss`: ``labels=`` on the kept tokens.
* :mod:`~vtprune.engine.hf`: the Hugging Face host, which installs the hooks and ties the rooms together.
  The vLLM host is :mod:`vtprune.integrations.vllm` (it runs the pre-LLM steps on each encoder call).

Importing this package imports none of them.
"""
