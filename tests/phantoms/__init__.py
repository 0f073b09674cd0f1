"""Test phantoms built independently of the project's own generators (``imaging_tasks.*.synth``).

A method checked only against the generator it was developed with can learn that generator's habits; the
phantoms here are made differently on purpose (:mod:`.independent_head`).
"""
