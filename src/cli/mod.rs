//! The binary's own modules: the command line's client, the demo and the
//! benchmark. None of this is part of the library; like any other program,
//! it uses only the library's public API.
//!
//! - [`client`]: the command line's side of the protocol (`put`, `get`,
//!   `rm`, `ls`, `clear`, `status`).
//! - [`folder`]: folders on top of flat keys (`put KEY DIR`,
//!   `get --prefix`, `ls PREFIX`).
//! - [`demo`]: what `make run` runs.
//! - [`bench`]: what `make bench` runs.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

pub mod bench;
pub mod client;
pub mod demo;
pub mod folder;

/// The buffer for moving file content between a socket and a file: the size
/// a node uses for its own, so the client and the benchmark's baselines
/// read and write in the same steps as a node.
const STREAM_BUFFER_LEN: usize = 256 * 1024;

/// A fresh directory under the system temp directory for one run of the
/// demo or the benchmark, removed when dropped, however the run ends.
struct ScratchDir(PathBuf);

impl ScratchDir {
    /// Creates `gossipfs-WHAT-PID-NANOS`. The process id keeps two runs at
    /// once apart, the time keeps a run apart from an earlier one's
    /// leftovers; `create_dir` fails rather than share a directory.
    fn new(what: &str) -> io::Result<ScratchDir> {
        let nanos =
            SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |since| since.as_nanos());
        let path =
            std::env::temp_dir().join(format!("gossipfs-{what}-{}-{nanos}", std::process::id()));
        std::fs::create_dir(&path)?;
        Ok(ScratchDir(path))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A file written under a temp name beside its target and renamed into
/// place on commit, so that the target is either absent or whole: a get that
/// fails halfway leaves no partial file. Dropped before a commit, the temp
/// file is removed.
pub struct OutputFile {
    /// `.NAME.gossipfs-PID.tmp` in the target's folder: the same file
    /// system, so the rename is atomic.
    temp: PathBuf,
    /// Where the file goes.
    target: PathBuf,
    /// The open temp file; `None` once committed.
    file: Option<File>,
}

impl OutputFile {
    /// Creates the temp file for `target`.
    ///
    /// # Errors
    ///
    /// An error naming the temp file if it cannot be created;
    /// `InvalidInput` if `target` has no file name (`/`, `..`).
    pub fn create(target: &Path) -> io::Result<OutputFile> {
        let name = target.file_name().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a file name", target.display()),
            )
        })?;
        let temp = target.with_file_name(format!(
            ".{}.gossipfs-{}.tmp",
            name.to_string_lossy(),
            std::process::id()
        ));
        let file = File::create(&temp).map_err(|err| {
            io::Error::new(err.kind(), format!("cannot write {}: {err}", temp.display()))
        })?;
        Ok(OutputFile { temp, target: target.to_path_buf(), file: Some(file) })
    }

    /// The temp file, to write the content into.
    pub fn file(&mut self) -> &mut File {
        self.file.as_mut().expect("the file is open until commit")
    }

    /// Syncs the temp file and renames it over the target, replacing
    /// whatever file is there.
    ///
    /// # Errors
    ///
    /// An error naming the target if the sync or the rename fails.
    pub fn commit(mut self) -> io::Result<()> {
        self.sync()?;
        fs::rename(&self.temp, &self.target).map_err(|err| self.naming_target(err))
    }

    /// Syncs the temp file and moves it to the target only if no file is
    /// there, even one that appears while we write: the hard link fails
    /// when the target exists, where a rename would replace it.
    ///
    /// # Errors
    ///
    /// `AlreadyExists`, naming the target, if it exists; an error naming the
    /// target if the sync or the move fails.
    pub fn commit_new(mut self) -> io::Result<()> {
        self.sync()?;
        match fs::hard_link(&self.temp, &self.target) {
            // Drop removes the temp name; the content stays under the target.
            Ok(()) => Ok(()),
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => Err(self.naming_target(err)),
            // A file system without hard links (FAT, some network mounts):
            // check, then rename. A file that appears in between is replaced.
            Err(_) => {
                if fs::symlink_metadata(&self.target).is_ok() {
                    let exists = io::Error::from(io::ErrorKind::AlreadyExists);
                    return Err(self.naming_target(exists));
                }
                fs::rename(&self.temp, &self.target).map_err(|err| self.naming_target(err))
            }
        }
    }

    /// Closes the temp file once its bytes are on disk: a crash after the
    /// rename must not leave an empty file under the target's name.
    fn sync(&mut self) -> io::Result<()> {
        let file = self.file.take().expect("the file is open until commit");
        file.sync_all().map_err(|err| self.naming_target(err))
    }

    fn naming_target(&self, err: io::Error) -> io::Error {
        io::Error::new(err.kind(), format!("cannot write {}: {err}", self.target.display()))
    }
}

impl Drop for OutputFile {
    fn drop(&mut self) {
        // After a rename the temp name is gone and this fails, harmlessly;
        // after a hard link it removes the temp name only.
        let _ = fs::remove_file(&self.temp);
    }
}
