"""The teacher side: what serves payloads to the students.

Entry points: ``actor.TeacherActor`` (a live teacher model in a Ray actor: payloads, pretraining, teaching a
store), ``store.StoreTeacher`` (the same payloads read from a store that ``mlot teach`` wrote),
``store.check_store`` (may this job read that store?), ``extras.Extras`` (the identity-aware payload and the
NLL per byte a teacher ships beside its payload). Both servers implement ``workers.serving.TeacherServer``.
"""
