//! Store and unpacking tests on real files. Importing needs root (chown,
//! mknod of whiteouts, trusted xattrs): those tests print a line and pass
//! when run by another user.

mod commit;
mod common;
mod layers;
mod records;
mod unpack;
