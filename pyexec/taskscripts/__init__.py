"""Scripts that run inside the Nomad runner-job tasks (stdlib only; see ``pyexec.nomad_job``)."""
