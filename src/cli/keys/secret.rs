//! `--output k8s-secret`: the updated key file as a Kubernetes Secret manifest, for
//! `kubectl apply -f -`. It holds hashes only; the new key itself goes to stderr.

use super::{usage, Failure, KeysArgs, KeysCommand, Output};

/// The data key the Secret holds the key file under: the file name deploy/kubernetes's
/// kustomization generates its Secret from, and so the name the pod mounts.
pub(super) const KEY_FILE_NAME: &str = "keys.yaml";

/// The Secret name when `--output k8s-secret` is asked for, checked; `None` otherwise.
pub(super) fn name_for(args: &KeysArgs) -> Result<Option<&str>, Failure> {
    let asked = match &args.command {
        KeysCommand::Create { secret_name, .. } => secret_name.as_deref(),
        KeysCommand::Rotate(r) => r.secret_name.as_deref(),
        _ if args.output == Output::K8sSecret => {
            return Err(usage(
                "--output k8s-secret applies to `keys create` and `keys rotate` only",
            ))
        }
        _ => None,
    };
    match (args.output, asked) {
        (Output::K8sSecret, Some(name)) if valid_name(name) => Ok(Some(name)),
        (Output::K8sSecret, Some(name)) => Err(usage(format!(
            "--secret-name {name:?}: expected a Kubernetes name (lowercase letters, digits, \
             '-' and '.', starting and ending with a letter or digit, at most 253)"
        ))),
        (Output::K8sSecret, None) => Err(usage("--output k8s-secret needs --secret-name NAME")),
        (_, Some(_)) => Err(usage("--secret-name applies only with --output k8s-secret")),
        (_, None) => Ok(None),
    }
}

/// An RFC 1123 subdomain, what Kubernetes accepts as a Secret's name.
fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 253
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'-' | b'.'))
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

/// The manifest: `stringData` keeps the key file readable in review (it holds hashes only).
/// The name is quoted: YAML 1.1 readers take `y`, `no` or `123` for something else.
pub(super) fn manifest(name: &str, key_file: &str) -> String {
    let mut out = format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: \"{name}\"\ntype: Opaque\nstringData:\n  {KEY_FILE_NAME}: |\n"
    );
    for line in key_file.lines() {
        out.push_str("    ");
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_kubernetes_names() {
        assert!(valid_name("postbox-keys"));
        assert!(valid_name("a.b-1"));
        for bad in ["", "Postbox", "-a", "a-", "a_b", "a b"] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn the_key_file_is_a_literal_block_read_back_unchanged() {
        let file = "# keygate key file\nkeys:\n  - id: a\n    scopes: [\"x\"]\n";
        let m = manifest("n", file);
        let doc: serde_json::Value = serde_saphyr::from_str(&m).unwrap();
        assert_eq!(doc["stringData"][KEY_FILE_NAME], file);
        assert_eq!(doc["metadata"]["name"], "n");
    }
}
