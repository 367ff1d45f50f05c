#![no_main]
// See lab-agent/src/fuzzing for what the target checks and its input format.
libfuzzer_sys::fuzz_target!(|data: &[u8]| lab_agent::fuzzing::dhcp(data));
