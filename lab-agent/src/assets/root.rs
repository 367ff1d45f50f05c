//! A directory served read-only, with every request confined to it: no
//! `..`, no absolute escape, no symlink leading outside, `\` taken as `/`,
//! regular files only.

use super::{Content, FileSource, OpenError};
use std::net::IpAddr;
use std::path::{Component, Path, PathBuf};

/// The confined root.
#[derive(Debug, Clone)]
pub struct DirRoot {
    root: PathBuf,
}

impl DirRoot {
    /// `root` must exist; it is canonicalized once here.
    pub fn new(root: &Path) -> std::io::Result<Self> {
        Ok(Self {
            root: root.canonicalize()?,
        })
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    /// The request path as clean relative components, or why it is refused.
    /// Leading `/` is allowed (iPXE and HTTP send absolute paths) and means
    /// the root.
    pub fn normalize(request: &str) -> Result<PathBuf, OpenError> {
        if request.contains('\0') {
            return Err(OpenError::Forbidden("NUL in path"));
        }
        let unified = request.replace('\\', "/");
        let mut out = PathBuf::new();
        for part in unified.split('/') {
            match part {
                "" | "." => {}
                ".." => return Err(OpenError::Forbidden("'..' in path")),
                p => {
                    // A part like "C:" or one Path reads as a root is refused.
                    let mut comps = Path::new(p).components();
                    match (comps.next(), comps.next()) {
                        (Some(Component::Normal(_)), None) => out.push(p),
                        _ => return Err(OpenError::Forbidden("bad path component")),
                    }
                }
            }
        }
        if out.as_os_str().is_empty() {
            return Err(OpenError::NotFound);
        }
        Ok(out)
    }

    /// Resolve inside the root, following symlinks only while they stay in it.
    pub fn resolve(&self, request: &str) -> Result<PathBuf, OpenError> {
        let rel = Self::normalize(request)?;
        let joined = self.root.join(rel);
        let real = match joined.canonicalize() {
            Ok(p) => p,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(OpenError::NotFound),
            Err(e) => return Err(OpenError::Io(e)),
        };
        if !real.starts_with(&self.root) {
            return Err(OpenError::Forbidden("path leads outside the root"));
        }
        Ok(real)
    }
}

impl FileSource for DirRoot {
    fn open(&self, path: &str, _client: Option<IpAddr>) -> Result<Content, OpenError> {
        let real = self.resolve(path)?;
        let file = std::fs::File::open(&real).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => OpenError::NotFound,
            _ => OpenError::Io(e),
        })?;
        let meta = file.metadata().map_err(OpenError::Io)?;
        if !meta.is_file() {
            return Err(OpenError::NotFound);
        }
        Ok(Content::File {
            file,
            len: meta.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn setup() -> (tempfile::TempDir, DirRoot) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("sub/file.txt"), b"inside").unwrap();
        std::fs::write(dir.path().join("secret"), b"outside").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret"), root.join("escape")).unwrap();
        std::os::unix::fs::symlink(root.join("sub/file.txt"), root.join("alias")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("etc")).unwrap();
        let r = DirRoot::new(&root).unwrap();
        (dir, r)
    }

    fn read(r: &DirRoot, p: &str) -> Result<Vec<u8>, OpenError> {
        match r.open(p, None)? {
            Content::File { mut file, .. } => {
                let mut v = Vec::new();
                file.read_to_end(&mut v).unwrap();
                Ok(v)
            }
            Content::Bytes(b) => Ok(b),
        }
    }

    #[test]
    fn serves_files_inside_in_every_spelling() {
        let (_d, r) = setup();
        for p in [
            "sub/file.txt",
            "/sub/file.txt",
            "sub\\file.txt",
            "./sub//file.txt",
            "alias",
        ] {
            assert_eq!(read(&r, p).unwrap(), b"inside", "{p}");
        }
    }

    #[test]
    fn refuses_every_escape() {
        let (_d, r) = setup();
        for p in [
            "../secret",
            "sub/../../secret",
            "..\\secret",
            "sub\\..\\..\\secret",
            "escape",
            "etc/passwd",
            "/etc/passwd",
        ] {
            match read(&r, p) {
                Err(OpenError::Forbidden(_)) | Err(OpenError::NotFound) => {}
                other => panic!("{p}: {other:?}"),
            }
        }
        assert!(matches!(
            read(&r, "escape"),
            Err(OpenError::Forbidden("path leads outside the root"))
        ));
        assert!(matches!(read(&r, "a\0b"), Err(OpenError::Forbidden(_))));
    }

    #[test]
    fn directories_and_missing_files_are_not_found() {
        let (_d, r) = setup();
        assert!(matches!(read(&r, "sub"), Err(OpenError::NotFound)));
        assert!(matches!(read(&r, "/"), Err(OpenError::NotFound)));
        assert!(matches!(read(&r, "nope"), Err(OpenError::NotFound)));
    }
}
