// Package hostblk is the one place in volagent that touches host block
// devices: block-device facts and operations, loop devices, loop pools,
// LVM, and the activation of LVM logical volumes as block devices.
// Everything above it asks hostblk and never runs losetup, lvm or an ioctl
// itself.
//
// # Block devices (blockdev.go)
//
// OpenDevice opens a block device; it fails for anything that is not one.
// With OpenOptions.Exclusive the open uses O_EXCL: it fails with an error
// matching ErrDeviceBusy if the device is mounted, held by the kernel, or
// already open exclusively, and while it is held nobody else can mount it
// or open it exclusively (plain opens are still possible; writers that
// matter use Exclusive). A Device reports Size (BLKGETSIZE64),
// LogicalBlockSize (BLKSSZGET), PhysicalBlockSize (BLKPBSZGET) and ReadOnly
// (BLKROGET); Inspect returns them all for a path. Discard (BLKDISCARD) and
// ZeroOut (BLKZEROOUT) take byte ranges that must be aligned to the logical
// block size and lie inside the device; otherwise they fail before any
// ioctl, naming the bad value. After ZeroOut the range reads as zeros;
// after Discard what it reads is up to the device.
//
// DeviceUsage reports who uses a device: kernel holders (sysfs holders/),
// loop devices backed by it, and whether an exclusive open is refused. The
// answer is a snapshot; hold an exclusive Device to keep others out.
//
// # Loop devices (loop.go)
//
// AttachLoop attaches a file or block device with one LOOP_CONFIGURE on a
// device from LOOP_CTL_GET_FREE, retrying with the next free device when a
// concurrent attacher won the race (EBUSY). Defaults: direct I/O on, 4096
// byte sectors, read-write, whole file, no autoclear (the device outlives
// volagent). If direct I/O is wanted but the backing filesystem or the
// kernel does not provide it, AttachLoop fails with ErrDirectIONotSupported
// and leaves nothing attached. Results:
//   - FindLoops(file) returns the devices attached to that file, matched by
//     inode (or device number for a block device), from sysfs; none is not
//     an error.
//   - GrowLoopFile grows the file (never shrinks) and sends
//     LOOP_SET_CAPACITY to each of its loop devices.
//   - SetLoopSizeLimit changes a device's size limit and capacity.
//   - DetachLoop detaches; an already detached device is not an error, and
//     a device still open elsewhere is detached by the kernel on last close.
//
// # Loop pools (looppool.go)
//
// A LoopPool is a directory of NAME.img backing files, each attached as a
// loop device. Each file carries its VolumeMeta in the xattr
// user.volagent.meta, and is created under a temporary name and hard-linked
// into place, so a volume appears complete with its metadata or not at all.
//   - Create: ErrVolumeExists if the name is taken; the file is removed
//     again if attaching fails.
//   - Grow: grows file and device; growing to the current size refreshes
//     the device; shrinking is refused; ErrVolumeNotFound for a missing name.
//   - Remove: detaches and deletes; ErrVolumeNotFound if already gone.
//   - AttachAll (start-up): removes leftovers of interrupted Creates,
//     reuses loop devices that are still attached and attaches the rest. It
//     returns the volumes it could attach and the joined errors of the
//     others (e.g. a file without metadata).
//
// # LVM (lvm.go, lvm_report.go, tags.go)
//
// LVM is the single exec layer over the lvm command. Every command runs
// with LC_ALL=C and LVM_SUPPRESS_FD_WARNINGS=1, reports are read as JSON
// (--reportformat json --units b --nosuffix, decoded from the output
// stream), commands that name a volume group run one at a time per volume
// group, and per-instance options (NoDeviceMapper for --driverloaded n,
// Devices for --devices, ExtraArgs) are added to every command, so tests
// and production share the same code. Every failure of a command is an
// *LVMError with the arguments, exit code and stderr; errors.Is matches
// ErrVGNotFound, ErrLVNotFound, ErrLVExists and ErrNoSpace from stderr.
// Names and tags are validated before anything runs.
//   - VolumeGroups/VolumeGroup: sizes and free space in bytes and extents.
//   - CreateLV rounds the size up to whole extents and returns the new LV.
//     With CreateOptions.Contiguous the LV and all its later extensions are
//     one run of extents, or the command fails with ErrNoSpace.
//   - ExtendLV grows to at least the given size; an LV already that large
//     is returned unchanged.
//   - RenameLV, RemoveLV, AddLVTags, DeleteLVTags: nil or an *LVMError.
//
// Tags are volagent's metadata store on LVM. VolumeMeta.Tags writes
// OwnerTag plus "volagent.KEY=VALUE" tags, and ParseVolumeTags rebuilds the
// VolumeMeta and ownership from an LV's tags, so a pool's state can be
// recovered from LVM alone. EncodeTagValue maps any string onto LVM's tag
// characters ("+XX" escapes) with exactly one encoding per value, and
// DecodeTagValue reverses it.
//
// # Activation (activate.go)
//
// An Activator turns an LV into a block device. The mode is configuration
// (ParseActivationMode never defaults) and NewActivator checks that the LVM
// matches it.
//   - ActivationDeviceMapper runs lvchange -ay; the device is /dev/VG/LV.
//   - ActivationLoop, for kernels without device-mapper, attaches a loop
//     device over the LV's physical volume at the LV's byte offset
//     (pe_start + first extent × extent size) limited to its size, with the
//     PV's sector size and direct I/O. It refuses, with ErrNotLoopMappable,
//     any LV that is not one linear contiguous run on one PV. It keeps no
//     state: the device of an LV is the loop whose backing device is the PV
//     and whose offset is the LV's, so DevicePath works after a restart and
//     Activate of an active LV returns the existing device. Refresh after
//     ExtendLV updates the loop's size limit and capacity; Activate does it
//     too if a Refresh was missed. Deactivate detaches the loop; an
//     inactive LV is not an error. Deactivate before RemoveLV: the loop
//     device would otherwise keep mapping freed extents.
package hostblk
