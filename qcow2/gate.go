package qcow2

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Gate is the one place that opens files an image names (backing files).
// It accepts a name only if it is a safe plain path (ValidateBackingName),
// makes a relative name relative to the directory of the image that names
// it exactly as qemu does (a string concatenation, never cleaned), and
// resolves it the way the kernel walks it: components left to right,
// symlinks followed where they stand and ".." taken from where the walk
// is, so "l/../s.raw" with l a symlink goes to the parent of l's target.
// It approves a name only if that file lies under one of AllowedRoots
// (themselves resolved the same way). It opens read-only, refuses /proc
// magic links, symlink loops and anything but regular files and block
// devices, and checks after opening that the kernel opened the very file
// it approved (same real path, device and inode), so a path swapped in
// between is caught.
//
// The zero Gate allows nothing.
type Gate struct {
	AllowedRoots []string
}

// maxSymlinks is the kernel's limit on symlinks followed in one lookup
// (MAXSYMLINKS); past it open fails with ELOOP.
const maxSymlinks = 40

// Resolve returns the absolute, symlink-free path of the file the kernel
// would open for name, as recorded in the image at imagePath, or an error
// wrapping ErrBackingName or ErrNotAllowed (a refusal) or the lookup's
// failure (a directory on the way that does not exist, a permission).
// When only the last component is missing, the path is where the kernel
// would look for it. It opens nothing: it walks the name with lstat and
// readlink only, so it may be used on names from hostile images.
func (g *Gate) Resolve(imagePath, name string) (string, error) {
	_, real, _, err := g.resolve(imagePath, name)
	return real, err
}

// resolve is Resolve that also returns the name as qemu combines it and
// the lstat of the file (Mode 0 when it does not exist).
func (g *Gate) resolve(imagePath, name string) (joined, real string, st unix.Stat_t, err error) {
	joined, err = joinBackingName(imagePath, name)
	if err != nil {
		return "", "", st, err
	}
	real, st, err = walk(joined)
	if err != nil {
		var fe *FieldError
		if errors.As(err, &fe) {
			fe.Value = name
			return joined, "", st, fe
		}
		return joined, "", st, fmt.Errorf("backing file %q named by %q: %w", name, imagePath, err)
	}
	if !g.underRoot(real) {
		return joined, real, st, &FieldError{Field: "backing_file", Value: name, Err: ErrNotAllowed,
			Reason: fmt.Sprintf("resolves to %q, which is under none of the allowed roots %q", real, g.AllowedRoots)}
	}
	return joined, real, st, nil
}

// CheckLexical judges name, as recorded in the image at imagePath, without
// touching the filesystem: the name must be safe, and the name as qemu
// combines it with the image's directory must have no "." or ".."
// component (the kernel takes ".." after following symlinks, so no lexical
// rule can judge it) and lie under an allowed root as written. Symlinks are
// not followed: it is a first filter, and Resolve or Open must still judge
// the name before anything is opened.
func (g *Gate) CheckLexical(imagePath, name string) (string, error) {
	p, err := joinBackingName(imagePath, name)
	if err != nil {
		return "", err
	}
	for _, c := range strings.Split(p, "/") {
		if c == "." || c == ".." {
			return "", &FieldError{Field: "backing_file", Value: name, Err: ErrNotAllowed,
				Reason: fmt.Sprintf("%q has a %q component; give a path without . or ..", p, c)}
		}
	}
	for _, root := range g.AllowedRoots {
		if isUnder(collapseSlashes(p), collapseSlashes(root)) {
			return p, nil
		}
	}
	return "", &FieldError{Field: "backing_file", Value: name, Err: ErrNotAllowed,
		Reason: fmt.Sprintf("%q is under none of the allowed roots %q", p, g.AllowedRoots)}
}

// collapseSlashes drops doubled and trailing slashes, which the kernel
// ignores; it leaves "." and ".." alone.
func collapseSlashes(p string) string {
	abs := strings.HasPrefix(p, "/")
	var parts []string
	for _, c := range strings.Split(p, "/") {
		if c != "" {
			parts = append(parts, c)
		}
	}
	s := strings.Join(parts, "/")
	if abs {
		s = "/" + s
	}
	return s
}

// joinBackingName validates name and combines it with the image's path
// (BackingPath).
func joinBackingName(imagePath, name string) (string, error) {
	if errs := ValidateBackingName(name); len(errs) > 0 {
		return "", &ValidationError{Violations: errs}
	}
	return BackingPath(imagePath, name), nil
}

// BackingPath is the path qemu opens for backing name recorded in the
// image at imagePath (its path_combine): an absolute name as it is, a
// relative one after the image path up to and including its last slash.
// Nothing is cleaned: the kernel walks the result, and a lexical clean
// would take ".." before the symlinks it follows.
func BackingPath(imagePath, name string) string {
	if strings.HasPrefix(name, "/") {
		return name
	}
	return imagePath[:strings.LastIndexByte(imagePath, '/')+1] + name
}

// ResolvePath returns the real path of the file open(p) would reach,
// walked as the kernel walks it (see walk), opening nothing. Unlike
// filepath.EvalSymlinks it never cleans p first, so ".." is taken after
// the symlinks before it. Only the last component may be missing.
func ResolvePath(p string) (string, error) {
	real, _, err := walk(p)
	return real, err
}

// walk resolves p as the kernel's path lookup for open(p) does (following
// a final symlink). A relative p starts at the working directory. It
// returns the real path and the file's lstat; when only the last
// component is missing, the path it would have and a zero Stat_t.
func walk(p string) (string, unix.Stat_t, error) {
	var st unix.Stat_t
	if !strings.HasPrefix(p, "/") {
		wd, err := unix.Getwd()
		if err != nil {
			return "", st, fmt.Errorf("working directory: %w", err)
		}
		p = wd + "/" + p
	}
	cur, rest, links := "/", p, 0
	for {
		rest = strings.TrimLeft(rest, "/")
		if rest == "" {
			return cur, st, nil
		}
		comp, after, more := strings.Cut(rest, "/")
		rest = after
		switch comp {
		case ".":
			continue
		case "..":
			cur = parentDir(cur)
			continue
		}
		next := cur + "/" + comp
		if cur == "/" {
			next = "/" + comp
		}
		st = unix.Stat_t{}
		if err := unix.Lstat(next, &st); err != nil {
			if err == unix.ENOENT && !more {
				return next, unix.Stat_t{}, nil
			}
			return "", st, &os.PathError{Op: "lstat", Path: next, Err: err}
		}
		switch st.Mode & unix.S_IFMT {
		case unix.S_IFLNK:
			links++
			if links > maxSymlinks {
				return "", st, &FieldError{Field: "backing_file", Err: ErrNotAllowed,
					Reason: fmt.Sprintf("more than %d symbolic links on the way (at %q): a symlink loop", maxSymlinks, next)}
			}
			var sfs unix.Statfs_t
			if err := unix.Statfs(cur, &sfs); err != nil {
				return "", st, &os.PathError{Op: "statfs", Path: cur, Err: err}
			}
			if sfs.Type == unix.PROC_SUPER_MAGIC {
				return "", st, &FieldError{Field: "backing_file", Err: ErrNotAllowed,
					Reason: fmt.Sprintf("goes through %q, a /proc link, which can lead anywhere", next)}
			}
			target, err := os.Readlink(next)
			if err != nil {
				return "", st, err
			}
			if strings.HasPrefix(target, "/") {
				cur = "/"
			}
			if more {
				// A trailing slash after a symlink still asks for a directory.
				target += "/"
			}
			rest = target + rest
		case unix.S_IFDIR:
			cur = next
		default:
			if more {
				return "", st, &os.PathError{Op: "lookup", Path: next + "/" + rest, Err: unix.ENOTDIR}
			}
			cur = next
		}
	}
}

// parentDir is the parent of a real (symlink-free, clean) absolute path.
func parentDir(p string) string {
	i := strings.LastIndexByte(p, '/')
	if i <= 0 {
		return "/"
	}
	return p[:i]
}

func (g *Gate) underRoot(real string) bool {
	for _, root := range g.AllowedRoots {
		if !strings.HasPrefix(root, "/") {
			continue
		}
		r, st, err := walk(root)
		if err != nil || st.Mode == 0 {
			continue // a root that does not exist holds nothing
		}
		if isUnder(real, r) {
			return true
		}
	}
	return false
}

// isUnder reports whether the clean absolute path p is root or inside it.
func isUnder(p, root string) bool {
	if !strings.HasPrefix(root, "/") {
		return false
	}
	return p == root || root == "/" || strings.HasPrefix(p, root+"/")
}

// Open approves name as Resolve does and opens it read-only, by the name
// as qemu combines it, walked by the kernel (openat2 refusing magic
// links). It then checks that the kernel opened the file it approved: the
// same real path (from /proc/self/fd), device and inode, and a regular
// file or block device. The file is first opened with O_PATH (which opens
// nothing: no FIFO, device or FUSE open happens) and only reopened for
// reading once it passed. It returns the open file and its real path.
func (g *Gate) Open(imagePath, name string) (*os.File, string, error) {
	joined, real, before, err := g.resolve(imagePath, name)
	if err != nil {
		return nil, "", err
	}
	if before.Mode == 0 {
		return nil, "", fmt.Errorf("backing file %q named by %q: %w", name, imagePath, &os.PathError{Op: "open", Path: real, Err: fs.ErrNotExist})
	}
	if err := checkOpenableType(real, before.Mode); err != nil {
		return nil, "", err
	}
	pathFD, err := openPath(joined)
	if err != nil {
		return nil, "", fmt.Errorf("opening backing file %q named by %q: %w", name, imagePath, err)
	}
	defer unix.Close(pathFD)
	changed := func(what string) error {
		return &FieldError{Field: "backing_file", Value: name, Err: ErrNotAllowed,
			Reason: fmt.Sprintf("%q changed while it was being opened (%s)", real, what)}
	}
	var got unix.Stat_t
	if err := unix.Fstat(pathFD, &got); err != nil {
		return nil, "", fmt.Errorf("backing file %q: %w", real, err)
	}
	if got.Dev != before.Dev || got.Ino != before.Ino {
		return nil, "", changed("another file is there now")
	}
	fdLink := "/proc/self/fd/" + strconv.Itoa(pathFD)
	opened, err := os.Readlink(fdLink)
	if err != nil {
		return nil, "", fmt.Errorf("backing file %q: real path of the opened file: %w", real, err)
	}
	if opened != real {
		return nil, "", changed(fmt.Sprintf("the kernel opened %q", opened))
	}
	// Reopening our own O_PATH descriptor through /proc reaches exactly the
	// inode checked above. O_NONBLOCK: nothing opened here may hang us.
	fd, err := unix.Open(fdLink, unix.O_RDONLY|unix.O_CLOEXEC|unix.O_NOCTTY|unix.O_NONBLOCK, 0)
	if err != nil {
		return nil, "", fmt.Errorf("opening backing file %q: %w", real, err)
	}
	f := os.NewFile(uintptr(fd), real)
	var after unix.Stat_t
	if err := unix.Fstat(fd, &after); err != nil {
		f.Close()
		return nil, "", fmt.Errorf("backing file %q: %w", real, err)
	}
	if after.Dev != before.Dev || after.Ino != before.Ino {
		f.Close()
		return nil, "", changed("reopened as another file")
	}
	if err := checkOpenableType(real, after.Mode); err != nil {
		f.Close()
		return nil, "", err
	}
	return f, real, nil
}

// openPath opens p with O_PATH as open(2) would walk it, refusing /proc
// magic links. Where openat2 is missing (kernels before 5.6) or filtered
// (a seccomp filter answering EPERM) it uses plain openat: the walk has
// already refused magic links, and Open checks what was opened anyway.
func openPath(p string) (int, error) {
	fd, err := unix.Openat2(unix.AT_FDCWD, p, &unix.OpenHow{
		Flags:   unix.O_PATH | unix.O_CLOEXEC,
		Resolve: unix.RESOLVE_NO_MAGICLINKS,
	})
	if err == unix.ENOSYS || err == unix.EPERM {
		fd, err = unix.Open(p, unix.O_PATH|unix.O_CLOEXEC, 0)
	}
	if err != nil {
		return -1, &os.PathError{Op: "open", Path: p, Err: err}
	}
	return fd, nil
}

func checkOpenableType(path string, mode uint32) error {
	switch mode & unix.S_IFMT {
	case unix.S_IFREG, unix.S_IFBLK:
		return nil
	}
	return &FieldError{Field: "backing_file", Value: path, Err: ErrNotAllowed,
		Reason: "only regular files and block devices can be backing files"}
}
