//! The fault suite, one binary (each binary links the whole stack): one module per kind of
//! fault (RELIABILITY.md has the table). Tests that load the machine take `HEAVY`, so no two of
//! them distort each other's timings; light ones run alongside.
mod api_guards;
mod backing_services;
mod bad_input;
mod contention;
mod context_props;
mod fairness;
mod model_trouble;
mod queue_age;
mod route_matrix;
mod send_load;
mod stop;
mod versions;
mod worker_processes;
