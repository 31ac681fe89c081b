"""Scripts run inside the Nomad runner-job tasks (stdlib only; see ``runner.nomad_job``)."""
