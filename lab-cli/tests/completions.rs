//! `lab completions SHELL`: the bash script, sourced in bash, completes
//! subcommands and options (called the way bash's programmable completion
//! calls it: COMP_WORDS, COMP_CWORD, then `_lab CMD CUR PREV`); the zsh and
//! fish scripts name the subcommands. Packages: bash (zsh and fish are not
//! needed).

use std::process::Command;

fn completions(shell: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_lab"))
        .args(["completions", shell])
        .env_remove("LAB_SERVER")
        .output()
        .expect("run lab");
    assert!(out.status.success(), "lab completions {shell}: {out:?}");
    String::from_utf8(out.stdout).expect("utf-8")
}

/// What bash offers for the command line `words` (the last word is the
/// one being completed).
fn bash_complete(words: &[&str]) -> Vec<String> {
    let quoted: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
    let cword = words.len() - 1;
    let prev = if cword > 0 { words[cword - 1] } else { "" };
    let body = format!(
        ". <(\"$LAB\" completions bash)\ncomplete -p lab >/dev/null || exit 3\nCOMP_WORDS=({})\nCOMP_CWORD={cword}\n\
         COMP_LINE='{}'\nCOMP_POINT=${{#COMP_LINE}}\n_lab lab '{}' '{prev}'\nprintf '%s\\n' \"${{COMPREPLY[@]}}\"\n",
        quoted.join(" "),
        words.join(" "),
        words[cword],
    );
    let out = Command::new("bash")
        .args(["--noprofile", "--norc", "-c", &body])
        .env("LAB", env!("CARGO_BIN_EXE_lab"))
        .env_remove("LAB_SERVER")
        .output()
        .expect("bash");
    assert!(
        out.status.success(),
        "bash: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect()
}

#[test]
fn bash_completes_lease_acquire() {
    assert_eq!(bash_complete(&["lab", "lease", "acq"]), ["acquire"]);
    let leases = bash_complete(&["lab", "lease", ""]);
    for sub in ["acquire", "renew", "release", "show", "list", "wait-ready"] {
        assert!(leases.contains(&sub.to_owned()), "{sub} not in {leases:?}");
    }
    let opts = bash_complete(&["lab", "lease", "acquire", "--pro"]);
    assert_eq!(opts, ["--profile"]);
    // The hidden man page generator is not offered.
    let top = bash_complete(&["lab", ""]);
    assert!(top.contains(&"completions".to_owned()), "{top:?}");
    assert!(!top.contains(&"manpage".to_owned()), "{top:?}");
}

#[test]
fn zsh_and_fish_scripts_name_the_commands() {
    let zsh = completions("zsh");
    assert!(
        zsh.starts_with("#compdef lab"),
        "{}",
        &zsh[..40.min(zsh.len())]
    );
    assert!(zsh.contains("wait-ready"));
    let fish = completions("fish");
    assert!(fish.contains("complete -c lab"));
    assert!(fish.contains("acquire"));
}

#[test]
fn an_unknown_shell_is_a_usage_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_lab"))
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
