"""The student side: one Ray Train worker per rank, training a DeepSpeed ZeRO engine on teacher payloads.

Entry points: ``recipe.train_loop_per_worker`` (``StudentRecipe``: setup -> train -> cleanup; the loss of a
micro-batch is ``mlot.objective``), ``engine`` (the DeepSpeed config, schedule and device-side collectives),
``payload_stream.PayloadStream`` (prefetched payloads from any ``workers.serving.TeacherServer``),
``checkpoint`` (save, restore, export), ``in_loop_eval`` (eval CE and truth metrics), ``tracking`` (rank 0's
buffered MLflow logging), ``on_policy`` (the student's own sampled answers), ``callbacks`` (test hooks passed
in by the caller). Imports nothing from ``workers.teacher``.
"""
