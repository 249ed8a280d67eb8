//! A throw-away PKI made with the openssl CLI, for the TLS tests (broker and cloud).

use std::path::PathBuf;
use std::process::Command;

/// A throw-away PKI in a tempdir.
pub struct Pki {
    dir: tempfile::TempDir,
}

impl Default for Pki {
    fn default() -> Self {
        Pki::new()
    }
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().expect("tempdir");
        // Readable by all: the harness copies what mosquitto needs into its own dir, but
        // other processes of a test (onboardd, openssl) may run as other users.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        Pki { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn openssl(&self, args: &[&str]) {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .expect("run the openssl CLI");
        assert!(
            out.status.success(),
            "openssl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `openssl req` making a new P-256 key `<name>.key` for the subject `CN=<cn>`,
    /// with `more` arguments saying what to make of it.
    fn req_with_new_key(&self, name: &str, cn: &str, more: &[&str]) {
        let key = format!("{name}.key");
        let subject = format!("/CN={cn}");
        let mut args = vec![
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-subj",
            &subject,
        ];
        args.extend_from_slice(more);
        self.openssl(&args);
    }

    /// A self-signed CA: `<name>.crt`, `<name>.key`.
    pub fn ca(&self, name: &str) -> PathBuf {
        let crt = format!("{name}.crt");
        self.req_with_new_key(
            name,
            name,
            &[
                "-x509",
                "-out",
                &crt,
                "-days",
                "2",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        );
        self.path(&crt)
    }

    /// A leaf `<name>.crt`/`<name>.key` signed by `ca`, with the given extensions.
    pub fn leaf(&self, ca: &str, name: &str, cn: &str, ext: &str) {
        std::fs::write(self.path(&format!("{name}.ext")), ext).unwrap();
        self.req_with_new_key(name, cn, &["-out", &format!("{name}.csr")]);
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.crt"),
            "-CAkey",
            &format!("{ca}.key"),
            "-set_serial",
            &format!("0x{:016x}", fastrand::u64(1..)),
            "-days",
            "2",
            "-out",
            &format!("{name}.crt"),
            "-extfile",
            &format!("{name}.ext"),
        ]);
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            self.path(&format!("{name}.key")),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
    }

    /// CA `ca`, server certificate `server` for 127.0.0.1 and localhost, client
    /// certificate `client` with CN `onboardd`.
    pub fn standard() -> Pki {
        let pki = Pki::new();
        pki.ca("ca");
        pki.leaf(
            "ca",
            "server",
            "localhost",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\n\
             basicConstraints=critical,CA:FALSE\n\
             keyUsage=critical,digitalSignature\n\
             extendedKeyUsage=serverAuth\n",
        );
        pki.leaf(
            "ca",
            "client",
            "onboardd",
            "basicConstraints=critical,CA:FALSE\n\
             keyUsage=critical,digitalSignature\n\
             extendedKeyUsage=clientAuth\n",
        );
        pki
    }
}
