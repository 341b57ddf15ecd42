//! Sans-IO SMTP: reply parser, command codec, EHLO capabilities, dot-stuffing
