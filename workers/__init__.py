"""The middle floor: everything that runs inside Ray processes (teacher actors, student workers, data tasks).

Three rooms, and a shared floor beside them:

* ``workers.data``: rows from a source to prepared tokens (tasks, the known-truth task, encoding, the answer
  cut, the one cached tokenisation pass, answer metrics). Imports neither of the other rooms.
* ``workers.teacher``: the teacher side (the live actor, the store's format, writer, reader and compatibility
  check, the extras a teacher ships beside its payload). Imports ``workers.data`` and the shared floor.
* ``workers.student``: the student side (the training recipe around a DeepSpeed engine, the payload stream,
  checkpoints and export, in-loop eval, tracking, plots, callbacks, on-policy sampling). Imports
  ``workers.data`` and the shared floor, never ``workers.teacher``: the two sides meet only through the
  teacher-server protocol (``workers.serving``).
* Shared floor: ``models`` (tokenizers and HF models), ``forward`` (answer-window logits), ``generation``
  (generated answers and their encoding on the teacher side), ``vocab`` (the tokenizer pair's vocabulary
  map), ``serving`` (the teacher-server protocol and the per-loss payload settings).

Nothing here reads a job file or wires a cluster: ``orchestrator/`` does, and hands these parts the config.
"""
